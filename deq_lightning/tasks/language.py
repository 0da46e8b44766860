"""Word-level language modelling with a DEQ-Transformer (or any model with the same interface).

Batches are ordered BPTT segments ``(tokens, targets)``; the memory (the previous segment's
equilibrium) is carried from one batch to the next within an epoch and reset at the start of each
epoch, where the ordered streams start again.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from deq_lightning.deq import DEQStats
from deq_lightning.metrics.language import TokenPerplexity

from .base import STAGES, DEQTask


def streams(mems: Any) -> int:
    """The batch size a memory was made for (a Memory, or one tensor per layer)."""
    while not isinstance(mems, Tensor):
        mems = mems[0]
    return mems.shape[0]


class Generated(NamedTuple):
    """Sampled token ids and the diagnostics of the solves that produced them."""

    ids: Tensor
    stats: list[DEQStats | None]


class LanguageModelTask(DEQTask):
    """Metrics: ``{train,val,test}/loss`` (nats/token), ``.../ppl`` (corpus perplexity, exact
    across ranks), ``.../bpt`` (bits per token), ``val/ppl_best`` and, when the data knows its
    entropy rate (the synthetic corpus), ``val/ppl_floor`` and ``test/ppl_floor``."""

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("model_from_data", ["vocab_size"])
        super().__init__(**kwargs)
        self.ppl = torch.nn.ModuleDict({f"{s}_ppl": TokenPerplexity() for s in STAGES})
        self.best_val_ppl = math.inf
        self._mems: dict[str, Any] = {}

    def step(self, batch: Any, stage: str) -> Tensor:
        tokens, targets = batch
        mems = self._mems.get(stage)
        if mems is not None and streams(mems) != tokens.shape[0]:
            mems = None  # a new set of streams
        out, stats = self.run_model(tokens, targets, mems)
        self._mems[stage] = out.mems
        loss = out.nll.mean()
        n = out.nll.numel()
        train = stage == "train"
        metric = self.ppl[f"{stage}_ppl"]
        metric.update(out.nll)
        self.log(
            f"{stage}/loss",
            loss.detach(),
            on_step=train,
            on_epoch=True,
            batch_size=n,
            sync_dist=not train,
            prog_bar=True,
        )
        self.log(f"{stage}/ppl", metric, on_step=False, on_epoch=True, prog_bar=True)
        self.log_deq(stats, stage, n)
        return self.add_deq_losses(loss, stats)

    def _reset_memory(self, stage: str) -> None:
        self._mems.pop(stage, None)

    def on_train_epoch_start(self) -> None:
        self._reset_memory("train")

    def on_validation_epoch_start(self) -> None:
        self._reset_memory("val")

    def on_test_epoch_start(self) -> None:
        self._reset_memory("test")

    def _epoch_end(self, stage: str) -> None:
        ppl = self.ppl[f"{stage}_ppl"].compute()
        self.log(f"{stage}/bpt", torch.log2(ppl), sync_dist=False)
        floor = getattr(self.trainer.datamodule, "ppl_floor", None)
        if floor is not None:
            self.log(f"{stage}/ppl_floor", float(floor))
        if stage == "val" and not self.trainer.sanity_checking:
            self.best_val_ppl = min(self.best_val_ppl, float(ppl))
            self.log("val/ppl_best", self.best_val_ppl)

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["best_val_ppl"] = self.best_val_ppl  # val/ppl_best survives a resume

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self.best_val_ppl = float(checkpoint.get("best_val_ppl", math.inf))

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        n_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> Generated:
        """Sample ``n_tokens`` after ``prompt`` (1-D token ids), carrying the memory token by
        token; also the stats of every solve (the prompt's, then one per token but the last).

        The prompt is read as one segment; every new token is then one DEQ solve on a segment of
        length 1 whose memory holds everything before it (up to ``eval_mem_len``).
        """
        if prompt.dim() != 1 or prompt.numel() == 0:
            raise ValueError("prompt must be a non-empty 1-D tensor of token ids")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        was_training = self.training
        self.eval()
        try:
            out, stats = self.run_model(prompt[None].to(self.device), None, None)
            new, solves = [], [stats]
            for i in range(n_tokens):
                logits = out.log_probs[0, -1] / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
                    logits = logits.masked_fill(logits < kth, -math.inf)
                token = torch.multinomial(logits.softmax(-1).cpu(), 1, generator=generator)
                new.append(int(token))
                if i < n_tokens - 1:  # the last token's successor is never drawn
                    out, stats = self.run_model(token.view(1, 1).to(self.device), None, out.mems)
                    solves.append(stats)
            return Generated(torch.tensor(new, dtype=torch.long), solves)
        finally:
            self.train(was_training)
