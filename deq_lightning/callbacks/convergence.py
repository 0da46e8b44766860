"""Convergence plot: residual vs solver step for the latest train and validation solves."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only


def render_traces(traces: dict, title: str) -> np.ndarray:
    """A log-scale plot of each stage's mean relative residual per solver step, as an RGB array."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5), dpi=100)
    for stage, trace in sorted(traces.items()):
        y = trace.clamp_min(1e-12).numpy()
        ax.semilogy(np.arange(1, len(y) + 1), y, marker="o", ms=3, label=stage)
    ax.set_xlabel("solver step (function evaluations)")
    ax.set_ylabel("relative residual ||f(z)-z|| / ||f(z)||")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    buf.seek(0)
    from PIL import Image

    return np.asarray(Image.open(buf).convert("RGB"))


class ConvergencePlot(pl.Callback):
    """Every ``every_n_epochs`` validation epochs, log the plot to W&B / TensorBoard and save a PNG.

    The task keeps the last solve's mean residual trace per stage in ``convergence_traces``.
    """

    def __init__(self, every_n_epochs: int = 1, save_dir: str | None = None) -> None:
        self.every_n_epochs = every_n_epochs
        self.save_dir = save_dir

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        traces = getattr(pl_module, "convergence_traces", None)
        if trainer.sanity_checking or not traces or trainer.current_epoch % self.every_n_epochs:
            return
        traces = {k: v for k, v in traces.items() if k in ("train", "val")}
        if not traces:
            return
        image = render_traces(traces, f"epoch {trainer.current_epoch}")
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                logger.log_image("convergence", images=[image], step=trainer.global_step)
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(
                    "convergence", image, trainer.global_step, dataformats="HWC"
                )
        if self.save_dir:
            from PIL import Image

            out = Path(self.save_dir)
            out.mkdir(parents=True, exist_ok=True)
            Image.fromarray(image).save(out / f"epoch_{trainer.current_epoch:03d}.png")
