"""A trained run read back: its directory, checkpoint and saved config, for every command that
uses one (``eval.py``, ``generate.py``, ``predict_*.py``, ``train_hypersolver.py``, the bench
scripts and :func:`deq_lightning.load`)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from deq_lightning.app.console import override_key
from deq_lightning.callbacks.checkpoint import LAST

CONFIG = Path(".hydra") / "config.yaml"
# Config groups whose option lands somewhere other than a node of the same name.
GROUP_NODES = {"strategy": "trainer.strategy"}
# Keys of the commands that read a run: never copied into the run's config.
RUN_KEYS = {"run_dir", "ckpt_path"}


@dataclass
class Run:
    """A training run: its directory, the checkpoint to use, its saved config (``None`` for a
    checkpoint outside a run directory)."""

    run_dir: Path
    ckpt: Path
    cfg: DictConfig | None

    @property
    def config(self) -> DictConfig:
        """The run's saved config; an error naming the file when the run has none."""
        if self.cfg is None:
            raise FileNotFoundError(
                f"{self.run_dir / CONFIG} not found: {self.run_dir} is not a train.py run "
                "directory; pass run_dir=<the training run's directory>"
            )
        return self.cfg

    def task_class(self, family: type | None = None, need: str = "") -> type[pl.LightningModule]:
        """The run's task class; with ``family``, an error saying ``need`` unless it is one."""
        cls = hydra.utils.get_class(self.config.task._target_)
        if family is not None and not issubclass(cls, family):
            raise ValueError(f"{self.run_dir} is a {cls.__name__} run; {need}")
        return cls

    def load_task(self, cls: type | None = None, **hparams: Any) -> pl.LightningModule:
        """The trained task on the CPU, in eval mode; ``hparams`` replace saved ones."""
        cls = cls or self.task_class()
        task = cls.load_from_checkpoint(self.ckpt, map_location="cpu", weights_only=True, **hparams)
        return task.eval()

    def datamodule(self) -> pl.LightningDataModule:
        """The run's DataModule (not set up: building it reads no data)."""
        return hydra.utils.instantiate(self.config.data, _convert_="all")


def load_run(path: str | Path, ckpt: str | Path | None = None) -> Run:
    """The run at ``path``: a run directory (its best checkpoint, else ``last.ckpt``) or a
    ``.ckpt`` file (its run directory is the one above ``checkpoints/``). ``ckpt`` picks another
    checkpoint of a run directory."""
    path = Path(path).expanduser()
    if path.is_file():
        run_dir, ckpt = path.resolve().parent.parent, Path(ckpt or path)
    elif path.is_dir():
        run_dir = path
        ckpt = Path(ckpt) if ckpt else saved_best_checkpoint(path)
    else:
        raise FileNotFoundError(
            f"{path} does not exist: expected a train.py run directory or a .ckpt file"
        )
    saved = run_dir / CONFIG
    return Run(run_dir, ckpt, OmegaConf.load(saved) if saved.is_file() else None)


def saved_best_checkpoint(run_dir: Path) -> Path:
    """The best checkpoint the training run tested (recorded in ``last.ckpt``'s callback
    state), else ``last.ckpt``; an error naming what a run directory holds when it has none."""
    last = run_dir / "checkpoints" / LAST
    if not last.is_file():
        raise FileNotFoundError(
            f"{run_dir} is not a train.py run directory: it has no checkpoints/{LAST} (a run "
            f"directory holds checkpoints/ and {CONFIG}); pass a run directory or a .ckpt file"
        )
    state = torch.load(last, map_location="cpu", weights_only=True)
    for key, cb in state.get("callbacks", {}).items():
        if key.startswith("ModelCheckpoint") and cb.get("best_model_path"):
            best = Path(cb["best_model_path"])
            local = last.parent / best.name  # the run dir may have moved
            return best if best.is_file() else local if local.is_file() else last
    return last


def run_from(cfg: DictConfig, script: str, skip: set[str] = frozenset(), merge: bool = True) -> Run:
    """The run an entry point names with ``run_dir=`` and/or ``ckpt_path=``; with ``merge``, its
    saved config overridden by the command line (except the ``skip`` keys, the entry point's
    own)."""
    if cfg.get("ckpt_path") and not Path(cfg.ckpt_path).is_file():
        raise FileNotFoundError(f"ckpt_path={cfg.ckpt_path} does not exist")
    if not cfg.get("run_dir") and not cfg.get("ckpt_path"):
        raise ValueError(f"{script} needs run_dir=<training run dir> or ckpt_path=<checkpoint>")
    run = load_run(cfg.get("run_dir") or cfg.ckpt_path, cfg.get("ckpt_path"))
    if merge and run.cfg is not None:
        run.cfg = merge_overrides(run.cfg, cfg, skip)
    return run


def merge_overrides(
    saved: DictConfig, composed: DictConfig, skip: set[str] = frozenset()
) -> DictConfig:
    """The run's saved config with each key the user overrode taken from ``composed``."""
    hc = HydraConfig.get()
    for override in hc.overrides.task:
        key = override_key(override)
        if key in RUN_KEYS or key in skip or key.startswith("hydra"):
            continue
        node = GROUP_NODES.get(key, key.replace("/", "."))
        with open_dict(saved):
            OmegaConf.update(saved, node, OmegaConf.select(composed, node), merge=False)
    with open_dict(saved):
        saved.paths = composed.paths
        saved.task_name = composed.task_name
        saved.callbacks = composed.callbacks  # the command's own (e.g. no checkpointing)
    return saved
