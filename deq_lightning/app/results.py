"""A finished stage's metrics: as floats, in ``metrics.json``, on the console, to a sweeper."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch
from pytorch_lightning.loggers import Logger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from deq_lightning.app.build import wandb_sync_hint
from deq_lightning.app.console import say
from deq_lightning.callbacks.checkpoint import write_atomic

TASK_METRICS = ("acc", "ppl", "miou", "epe")


def floats(metrics: dict[str, Any]) -> dict[str, float]:
    """Scalar metrics as floats; Lightning's ``_step``/``_epoch`` twins folded into one key."""
    out = {}
    for k, v in metrics.items():
        v = v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v
        if k.endswith("_step") or not isinstance(v, int | float) or isinstance(v, bool):
            continue
        out[k.removesuffix("_epoch")] = float(v)
    return dict(sorted(out.items()))


@rank_zero_only
def write_metrics(path: Path, metrics: dict[str, float]) -> None:
    """``metrics.json`` (non-finite values as ``null``: JSON has no NaN)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}
    write_atomic(path, lambda f: f.write((json.dumps(clean, indent=2) + "\n").encode()))


@rank_zero_only
def report(output_dir: Path, metrics: dict[str, float], loggers: list[Logger]) -> None:
    """The final metrics, the headline and where they were written, on the console."""
    shown = {k: v for k, v in metrics.items() if k.startswith(("test/", "val/"))}
    say("final metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in shown.items()))
    headline = headline_metrics(metrics)
    if headline:
        say(headline)
    say(f"metrics written to {output_dir.resolve() / 'metrics.json'}")
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            hint = wandb_sync_hint(logger)
            if hint:
                say(hint)


def headline_metrics(metrics: dict[str, float]) -> str | None:
    """``test: acc=0.981, 96.3% of samples at their fixed point``: the result and whether it
    came from an equilibrium, side by side (the last stage that has them)."""
    for stage in ("test", "val"):
        result = [
            f"{m}={metrics[f'{stage}/{m}']:.4g}" for m in TASK_METRICS if f"{stage}/{m}" in metrics
        ]
        converged = metrics.get(f"{stage}/fwd_converged")
        if not result:
            continue
        if converged is None:
            return f"{stage}: {', '.join(result)} (no equilibrium solve: an explicit model)"
        return (
            f"{stage}: {', '.join(result)}, {converged:.1%} of samples at their fixed point "
            f"({stage}/fwd_converged)"
        )
    return None


def finish(loggers: list[Logger]) -> None:
    """Close W&B and process groups so the next multirun job starts clean."""
    if any(isinstance(lg, WandbLogger) for lg in loggers):
        import wandb

        wandb.finish()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    # Lightning's DDP leaves these behind; the next multirun job must not inherit them.
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"):
        os.environ.pop(var, None)


def metric_value(metrics: dict[str, float], name: str | None) -> float | None:
    """The value a sweeper optimises; a clear error when it was never logged."""
    if not name:
        return None
    if name not in metrics:
        raise KeyError(
            f"optimized_metric '{name}' was not logged; available: {', '.join(sorted(metrics))}"
        )
    return metrics[name]
