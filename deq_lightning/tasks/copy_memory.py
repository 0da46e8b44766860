"""The copy-memory task on any sequence model with the language models' interface.

The model reads a whole sample (a short symbol sequence, T blanks, the recall cue) from a fresh
state and predicts the next token at every position, as a language model does; only the recalled
positions are scored (targets :data:`~deq_lightning.datamodules.copy_memory.IGNORE` elsewhere).
DEQ-TrellisNet and DEQ-Transformer both fit: ``model(tokens, None, None) -> (LMOutput, stats)``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import MaxMetric, MeanMetric

from deq_lightning.datamodules.copy_memory import IGNORE

from .base import STAGES, DEQTask


class CopyMemoryTask(DEQTask):
    """Metrics: ``{train,val,test}/loss`` (mean NLL of the recalled symbols, nats),
    ``.../recall_acc`` (fraction of recalled symbols right), ``.../recall_seq_acc`` (fraction of
    samples with every symbol right), ``val/recall_acc_best``."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("model_from_data", ["vocab_size"])
        super().__init__(**kwargs)
        self.metrics = torch.nn.ModuleDict(
            {
                f"{s}_{name}": MeanMetric()
                for s in STAGES
                for name in ("loss", "recall_acc", "recall_seq_acc")
            }
        )
        self.val_recall_best = MaxMetric()

    def step(self, batch: Any, stage: str) -> Tensor:
        tokens, targets = batch
        out, stats = self.run_model(tokens, None, None)
        recalled = targets != IGNORE  # (B, L)
        if not recalled.any():
            raise ValueError(
                "a copy-memory batch has no recalled position (every target is IGNORE); "
                "the data must be CopyMemoryDataModule's (inputs, targets) batches"
            )
        log_probs = out.log_probs[recalled]  # (N, V)
        wanted = targets[recalled]
        nll = -log_probs.gather(1, wanted[:, None]).squeeze(1)
        loss = nll.mean()
        right = (log_probs.argmax(-1) == wanted).float()
        per_sample = torch.zeros_like(targets, dtype=right.dtype)
        per_sample[recalled] = 1.0 - right
        all_right = (per_sample.sum(1) == 0).float()
        m = self.metrics
        m[f"{stage}_loss"].update(loss.detach(), nll.numel())
        m[f"{stage}_recall_acc"].update(right.mean(), right.numel())
        m[f"{stage}_recall_seq_acc"].update(all_right.mean(), all_right.numel())
        for name in ("loss", "recall_acc", "recall_seq_acc"):
            self.log(
                f"{stage}/{name}",
                m[f"{stage}_{name}"],
                on_step=False,
                on_epoch=True,
                prog_bar=name != "recall_seq_acc",
            )
        if stage == "train":
            self.log("train/loss_step", loss.detach(), on_step=True, on_epoch=False)
        self.log_deq(stats, stage, tokens.shape[0])
        return self.add_deq_losses(loss, stats)

    def on_train_start(self) -> None:
        self.metrics["val_recall_acc"].reset()  # sanity-check batches are not a result

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        self.val_recall_best.update(self.metrics["val_recall_acc"].compute())
        self.log("val/recall_acc_best", self.val_recall_best.compute(), sync_dist=True)
