"""Optical-flow data: FlyingChairs, FlyingThings3D, MPI-Sintel, KITTI-2015, HD1K and the thesis's
Sintel fine-tuning mix, as presets of one DataModule; and synthetic pairs from scikit-image
photos (the embedded default, ``flow_synthetic``).

Every sample is a dict: ``image1``/``image2`` ``(3, H, W)`` float32 in ``[0, 255]``, ``flow``
``(2, H, W)`` float32 in pixels (u right, v down), ``valid`` ``(H, W)`` float32 (1 where the
ground truth counts: KITTI/HD1K are sparse; dense sets mark ``|u|, |v| < 1000`` as in the thesis).
Unlabelled benchmark frames (``predict_dataloader``) carry ``name`` (the submission file's
relative path) and ``new_sequence`` (reset a warm start there) instead of flow and valid.

A preset is a file ``conf/data/<name>.yaml`` (chairs, things, sintel, kitti, hd1k, flow_mix)
targeting :class:`FlowDataModule`; it holds every value, the constructor has no defaults of its
own. Training batches are random crops (``flow_augment``), so they stack; evaluation runs on
whole frames one pair per batch, as the benchmarks' sizes differ (KITTI) and the model pads them
itself. The on-disk layouts and their readers are in ``flow_index``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import ConcatDataset, DataLoader, Dataset

from deq_lightning.datamodules.checks import check_train_size, check_verify_mode, verify_files
from deq_lightning.datamodules.common import eval_loader, per_device_batch_size
from deq_lightning.datamodules.flow_augment import FlowAugmentor
from deq_lightning.datamodules.flow_index import (
    EVAL_SETS,
    PREDICT_SETS,
    TRAIN_PARTS,
    FlowPairs,
    FlowSample,
)
from deq_lightning.datamodules.flow_synthetic import (
    SyntheticFlowDataModule,
    SyntheticFlowPairs,
    load_skimage_photos,
)

PASSES = ("clean", "final")
PASS_PARTS = ("things", "sintel")  # in data.weights without a pass: one part per data.passes
AUGMENT_KEYS = ("min_scale", "max_scale", "do_flip")


def check_preset(
    weights: Mapping[str, int],
    passes: Sequence[str],
    part_augment: Mapping[str, Mapping[str, Any]],
    val_sets: Sequence[str],
    predict_sets: Sequence[str],
) -> None:
    """Reject unknown names and bad weights at construction, naming the config key."""
    parts = [*TRAIN_PARTS, *PASS_PARTS]
    for key, names, known in (
        ("data.weights", weights, parts),
        ("data.passes", passes, PASSES),
        ("data.part_augment", part_augment, parts),
        ("data.val_sets", val_sets, EVAL_SETS),
        ("data.predict_sets", predict_sets, PREDICT_SETS),
    ):
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"{key}: unknown name(s) {unknown}; choose from {sorted(known)}")
    if any(int(w) != w or w < 0 for w in weights.values()) or not any(weights.values()):
        raise ValueError(f"data.weights must be non-negative integers, not all 0; got {weights}")
    if not passes and any(weights.get(p) for p in PASS_PARTS):
        raise ValueError(f"data.passes must name some of {list(PASSES)} to train on things/sintel")
    for part, opts in part_augment.items():
        bad = sorted(set(opts) - set(AUGMENT_KEYS))
        if bad:
            raise ValueError(
                f"data.part_augment.{part}: unknown key(s) {bad}; keys: {AUGMENT_KEYS}"
            )


class FlowDataModule(pl.LightningDataModule):
    """The real flow datasets, one preset per ``conf/data/<name>.yaml``.

    ``weights`` repeat each training part that many times per epoch (0 drops it): ``chairs``
    (its train split), ``things_clean``/``things_final`` (TRAIN), ``sintel_clean``/
    ``sintel_final``, ``kitti``, ``hd1k``; ``things`` or ``sintel`` stand for one part per pass
    in ``passes``. Every part is augmented with ``min_scale``/``max_scale`` (log2 of the random
    scale) and ``do_flip``, except for the keys ``part_augment[part]`` overrides (``things`` or
    ``sintel`` there: both passes); KITTI and HD1K use the sparse-aware variant.

    ``val_sets`` name the labelled sets validated (and tested) on, one dataloader each, in
    ``val_names`` order: ``chairs`` (its validation split), ``things_clean``/``things_final``
    (TEST), ``sintel_clean``/``sintel_final``, ``kitti`` and ``hd1k`` (their training sets, as
    in the thesis). ``predict_sets`` name unlabelled benchmark test sets for submissions:
    ``sintel_test_clean``, ``sintel_test_final``, ``kitti_test``. Evaluation and prediction load
    whole frames, ``val_batch_size`` (per device) at a time. ``name`` (the preset's) labels
    messages.
    """

    def __init__(
        self,
        name: str,
        data_dir: str,
        batch_size: int,
        num_workers: int,
        crop_size: Sequence[int],
        weights: Mapping[str, int],
        min_scale: float,
        max_scale: float,
        do_flip: bool,
        val_sets: Sequence[str],
        predict_sets: Sequence[str],
        val_batch_size: int,
        verify: bool | str,
        passes: Sequence[str] = (),
        part_augment: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        check_verify_mode(verify)
        check_preset(weights, passes, part_augment or {}, val_sets, predict_sets)
        super().__init__()
        self.save_hyperparameters()
        self.label = f"data={name}"
        self.train_set: Dataset | None = None
        self.eval_sets: dict[str, Dataset] | None = None
        self.predict_sets: dict[str, Dataset] | None = None
        self.batch_size_per_device: int | None = None

    @property
    def val_names(self) -> list[str]:
        return list(self.hparams.val_sets)

    def train_parts(self) -> dict[str, tuple[int, FlowAugmentor]]:
        """Part name -> (repeats per epoch, augmentor), in ``weights`` order."""
        hp = self.hparams
        base, special = {k: hp[k] for k in AUGMENT_KEYS}, hp.part_augment or {}
        parts = {}
        for key, repeats in hp.weights.items():
            names = [f"{key}_{p}" for p in hp.passes] if key in PASS_PARTS else [key]
            for name in names if repeats else []:
                family = name.split("_")[0]  # part_augment.sintel: both Sintel passes
                opts = base | dict(special.get(family, {})) | dict(special.get(name, {}))
                sparse = TRAIN_PARTS[name].index.sparse
                parts[name] = (int(repeats), FlowAugmentor(hp.crop_size, **opts, sparse=sparse))
        return parts

    def build_train(self) -> Dataset:
        data_dir = self.hparams.data_dir
        parts: list[Dataset] = []
        for name, (repeats, augment) in self.train_parts().items():
            parts += [FlowPairs(TRAIN_PARTS[name].samples(data_dir), augment, name)] * repeats
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)

    def sample_names(self, indices: Sequence[int]) -> list[str]:
        """The first frame of training samples ``indices`` (for warnings about a batch)."""
        out = []
        for i in indices:
            dataset, j = self.train_set, int(i)
            if isinstance(dataset, ConcatDataset):
                part = int(np.searchsorted(dataset.cumulative_sizes, j, side="right"))
                j -= dataset.cumulative_sizes[part - 1] if part else 0
                dataset = dataset.datasets[part]
            out.append(str(dataset.samples[j].image1))
        return out

    def verify_sets(self) -> None:
        """``data.verify``: every file of the training parts and evaluation sets, at setup."""
        mode = self.hparams.verify
        if not mode:
            return
        sets = [*getattr(self.train_set, "datasets", [self.train_set])]
        sets += list((self.eval_sets or {}).values())
        files: dict[Path, Callable[[Path], object]] = {}
        for ds in sets:
            if ds is not None:
                for path, check in ds.checks(mode):
                    files.setdefault(path, check)
        verify_files(self.label, list(files.items()), "training and evaluation sets")

    def setup(self, stage: str | None = None) -> None:
        self.batch_size_per_device = per_device_batch_size(self.hparams.batch_size, self.trainer)
        data_dir = self.hparams.data_dir
        if stage in ("fit", None) and self.train_set is None:
            self.train_set = self.build_train()
        if stage in ("fit", "validate", "test", None) and self.eval_sets is None:
            self.eval_sets = {
                n: FlowPairs(EVAL_SETS[n].samples(data_dir), None, n) for n in self.val_names
            }
            self.verify_sets()
        if stage == "fit":
            # drop_last: a split smaller than the batch would train zero steps.
            check_train_size(len(self.train_set), self.hparams.batch_size, self.label, "pairs")
        if stage == "predict" and self.predict_sets is None:
            names = list(self.hparams.predict_sets)
            if not names:
                raise ValueError(
                    f"{self.label} has no benchmark test sets; set data.predict_sets to some of "
                    f"{sorted(PREDICT_SETS)}"
                )
            self.predict_sets = {
                n: FlowPairs(PREDICT_SETS[n].samples(data_dir), None, n) for n in names
            }

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise RuntimeError("call setup('fit') before asking for the train dataloader")
        workers = self.hparams.num_workers
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size_per_device,
            shuffle=True,
            drop_last=True,  # batch norm in the context encoder
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def _eval_loaders(self, sets: dict[str, Dataset] | None, what: str) -> list[DataLoader]:
        if sets is None:
            raise RuntimeError(f"call setup() before asking for the {what} dataloaders")
        # Every pair on exactly one rank (no padding sampler): metrics summed over ranks are exact.
        return [
            eval_loader(
                ds,
                self.hparams.val_batch_size,
                self.hparams.num_workers,
                self.trainer,
                pin_memory=torch.cuda.is_available(),
            )
            for ds in sets.values()
        ]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.eval_sets, "validation")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.eval_sets, "test")

    def predict_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.predict_sets, "predict")


# Re-exported: older run configs and callers import these from here.
__all__ = [
    "FlowAugmentor",
    "FlowDataModule",
    "FlowPairs",
    "FlowSample",
    "SyntheticFlowDataModule",
    "SyntheticFlowPairs",
    "load_skimage_photos",
]
