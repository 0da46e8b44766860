"""LightningDataModules: classification, segmentation, optical flow, language modelling and the
copy-memory task, each with an embedded default that needs no download.

How to add a dataset (say ``data=mine``):

1. A preset ``conf/data/mine.yaml`` with ``_target_`` and every value the DataModule takes (batch
   size, crops, splits, augmentation). The YAML is the only place defaults live, so a run's saved
   config says everything; for a new flow set, target ``flow.FlowDataModule`` and name its parts.
2. A reader of the real on-disk layout, as the files come from the dataset's page: list the files
   (sorted, so indices are stable) and raise ``common.DatasetLayoutError`` with the expected
   layout when they do not fit (flow: a ``flow_index.FlowIndex`` subclass and its ``FlowSet``s).
3. An embedded default (synthetic or shipped with a dependency) where the real data is large, so
   the experiment runs on a CPU out of the box.
4. Checks from ``checks``: decoder errors named by file (``read_named``), ``data.verify``, a
   training split smaller than one batch; evaluation loaders from ``common.eval_loader``, which
   counts every sample once across DDP ranks.
5. A test in ``tests/datamodules`` that writes a few tiny files in the real layout, composes the
   preset and loads a batch from it.
"""
