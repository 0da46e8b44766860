"""Image classification (MDEQ on digits, CIFAR-10, ImageNet; or any explicit baseline)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MaxMetric, MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from .base import STAGES, DEQTask


class ClassificationTask(DEQTask):
    """Cross-entropy on ``(images, labels)`` batches; top-1 (and top-5) accuracy per stage.

    Metrics: ``{train,val,test}/loss``, ``.../acc``, ``.../acc5`` (when ``top5``), ``val/acc_best``.
    """

    def __init__(
        self, num_classes: int, top5: bool = False, label_smoothing: float = 0.0, **kwargs: Any
    ) -> None:
        if top5 and num_classes < 5:
            raise ValueError(f"task.top5 needs at least 5 classes, the model has {num_classes}")
        super().__init__(**kwargs)
        self.num_classes, self.top5, self.label_smoothing = num_classes, top5, label_smoothing
        # One metric object per stage (Lightning resets and syncs each across ranks).
        metrics = {}
        for s in STAGES:
            metrics[f"{s}_loss"] = MeanMetric()
            metrics[f"{s}_acc"] = MulticlassAccuracy(num_classes, average="micro")
            if top5:
                metrics[f"{s}_acc5"] = MulticlassAccuracy(num_classes, top_k=5, average="micro")
        self.metrics = torch.nn.ModuleDict(metrics)
        self.val_acc_best = MaxMetric()

    def step(self, batch: Any, stage: str) -> Tensor:
        x, y = batch
        logits, stats = self.run_model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.label_smoothing)
        n = y.shape[0]
        m = self.metrics
        m[f"{stage}_loss"].update(loss.detach(), n)
        m[f"{stage}_acc"].update(logits.detach(), y)
        self.log(f"{stage}/loss", m[f"{stage}_loss"], on_step=False, on_epoch=True, prog_bar=True)
        self.log(f"{stage}/acc", m[f"{stage}_acc"], on_step=False, on_epoch=True, prog_bar=True)
        if self.top5:
            m[f"{stage}_acc5"].update(logits.detach(), y)
            self.log(f"{stage}/acc5", m[f"{stage}_acc5"], on_step=False, on_epoch=True)
        if stage == "train":
            self.log("train/loss_step", loss.detach(), on_step=True, on_epoch=False)
        self.log_deq(stats, stage, n)
        return self.add_deq_losses(loss, stats)

    def on_train_start(self) -> None:
        # Sanity-check batches must not count towards the best validation accuracy (the best
        # itself is never updated while sanity checking, and a resumed run keeps it).
        self.metrics["val_acc"].reset()

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self.val_acc_best.update(self.metrics["val_acc"].compute())
        self.log("val/acc_best", self.val_acc_best.compute(), sync_dist=True)
