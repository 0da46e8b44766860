"""What the entry points do, as plain functions of a composed config, and the Python API.

The root scripts (``train.py``, ``eval.py``, ``generate.py``, ``predict_seg.py``,
``predict_flow.py``, ``train_hypersolver.py``) are thin ``@hydra.main`` shims over
:mod:`.train`, :mod:`.evaluate`, :mod:`.generate`, :mod:`.predict_seg`, :mod:`.predict_flow` and
:mod:`.hypersolver`, so that tests and notebooks call the same functions. Every command that
reads a trained run finds it through :func:`.runs.load_run`; :mod:`.inference` serves
``deq_lightning.load`` (predictions outside any Trainer). The rest is the training run's
plumbing: config checks (:mod:`.checks`), object construction (:mod:`.build`), run status and
resume (:mod:`.status`), results (:mod:`.results`), sweep summaries (:mod:`.sweeps`) and console
output (:mod:`.console`).
"""
