"""The shared loop of the writers that save each prediction of ``trainer.predict`` as files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.callbacks import BasePredictionWriter
from torch import Tensor


class NamedPredictionWriter(BasePredictionWriter):
    """Writes each item of a batch's prediction ``{"names": [...], key: (B, ...) tensor}``
    under ``output_dir`` with :meth:`write` (``key`` is the subclass's); ``written`` lists the
    files."""

    key: str

    def __init__(self, output_dir: str) -> None:
        super().__init__("batch")
        self.output_dir = Path(output_dir)
        self.written: list[Path] = []

    def write(self, name: str, item: Tensor) -> Any:
        raise NotImplementedError

    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Sequence[int] | None,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        for name, item in zip(prediction["names"], prediction[self.key]):
            self.write(name, item)
