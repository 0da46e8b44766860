"""A run dir's state: ``run_status.json``, the checkpoint a restart continues from, and what a
failed run left behind."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig
from pytorch_lightning.utilities import rank_zero_only

from deq_lightning.app.console import current_overrides, say
from deq_lightning.app.sweeps import STATUS_FILE, update_sweep_summary
from deq_lightning.callbacks.checkpoint import LAST, LastCheckpoint, write_atomic


def read_status(output_dir: Path) -> dict[str, Any] | None:
    """The run dir's ``run_status.json``, or ``None`` before the first run."""
    path = output_dir / STATUS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


@rank_zero_only
def write_status(output_dir: Path, status: str) -> None:
    """``run_status.json``: running / completed / stopped (a signal; resumable) / failed."""
    old = read_status(output_dir) or {}
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    record = {
        "status": status,
        "overrides": current_overrides(),
        "started": old.get("started", now) if status != "running" else now,
        "updated": now,
    }
    text = json.dumps(record, indent=1) + "\n"
    write_atomic(output_dir / STATUS_FILE, lambda f: f.write(text.encode()))


def finished_run(cfg: DictConfig, output_dir: Path) -> dict[str, float] | None:
    """The saved metrics of a completed run in ``output_dir`` with the same overrides, when
    ``skip_finished`` is on; ``None``: run it."""
    status = read_status(output_dir)
    if not status or status.get("status") != "completed" or not cfg.get("skip_finished", True):
        return None
    if status.get("overrides") != current_overrides():
        say(
            f"{output_dir} holds a completed run with other overrides "
            f"({' '.join(status.get('overrides', []))}): continuing it with these"
        )
        return None
    metrics_file = output_dir / "metrics.json"
    saved = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    say(f"already completed ({STATUS_FILE}): not run again (skip_finished=false re-runs it)")
    update_sweep_summary(cfg)
    return {k: (math.nan if v is None else float(v)) for k, v in saved.items()}


def resume_path(cfg: DictConfig, output_dir: Path) -> str | None:
    """The checkpoint this run continues from.

    ``ckpt_path`` as given (``last``: this run dir's ``checkpoints/last.ckpt``); else, when
    ``resume`` is on, the newest of ``checkpoints/last.ckpt`` and Lightning's SLURM
    ``hpc_ckpt_<n>.ckpt`` in the run dir (a requeued job).
    """
    last = output_dir / "checkpoints" / LAST
    if cfg.get("ckpt_path"):
        return str(last) if cfg.ckpt_path == "last" and last.is_file() else cfg.ckpt_path
    if not cfg.get("resume", True):
        return None
    candidates = [p for p in [last, *output_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
    if not candidates:
        return None
    newest = max(candidates, key=lambda p: p.stat().st_mtime)
    say(f"resuming from {newest}")
    return str(newest)


def checkpoint_step(path: str | None) -> int | None:
    """The global step a checkpoint file was written at (memory-mapped: nothing else is read)."""
    if not path or not Path(path).is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return int(state.get("global_step", 0))


def failure_hint(output_dir: Path, trainer: pl.Trainer | None) -> str | None:
    """What a failed run left behind and the command that continues it (``None``: nothing to
    continue, e.g. the data failed before training started)."""
    callbacks = trainer.callbacks if trainer is not None else []
    last = next((c for c in callbacks if isinstance(c, LastCheckpoint)), None)
    note = last.failure_note if last is not None else ""
    ckpt = output_dir / "checkpoints" / LAST
    if not ckpt.is_file():
        return f"{note}; nothing to resume from" if note else None
    if not note:
        note = f"the newest checkpoint is {ckpt}"
    command = " ".join(
        ["python train.py", *current_overrides(), f"hydra.run.dir={output_dir.resolve()}"]
    )
    return f"{note}. After fixing the cause, continue the run with: {command}"
