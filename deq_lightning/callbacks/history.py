"""Write the scalar metrics of every validation epoch to a JSON file (a logger-free record)."""

from __future__ import annotations

import json
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only


class MetricHistory(pl.Callback):
    """Appends ``{step, epoch, metric: value, ...}`` after each validation to ``path``."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self.rows: list[dict] = []

    @rank_zero_only
    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        row = {"step": trainer.global_step, "epoch": trainer.current_epoch}
        for k, v in trainer.callback_metrics.items():
            if isinstance(v, torch.Tensor) and v.numel() == 1:
                row[k] = v.item()
        self.rows.append(row)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text(json.dumps(self.rows, indent=1))
