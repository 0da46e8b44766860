"""The shared schedule of the callbacks that log evaluation examples as images."""

from __future__ import annotations

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only


class EvalImages(pl.Callback):
    """Logs the examples a task kept, every ``every_n_epochs`` validations and after testing.

    Subclasses say how in :meth:`log_stage`; at most ``max_images`` examples, also saved as PNGs
    under ``save_dir`` when it is set.
    """

    def __init__(
        self, max_images: int = 4, every_n_epochs: int = 1, save_dir: str | None = None
    ) -> None:
        if max_images < 1 or every_n_epochs < 1:
            raise ValueError("max_images and every_n_epochs must be >= 1")
        self.max_images, self.every_n_epochs, self.save_dir = max_images, every_n_epochs, save_dir

    @rank_zero_only
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking or trainer.current_epoch % self.every_n_epochs:
            return
        self.log_stage(trainer, pl_module, "val")

    @rank_zero_only
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.log_stage(trainer, pl_module, "test")

    def log_stage(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        raise NotImplementedError
