"""Token-level perplexity that is exact across DDP ranks."""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric


class TokenPerplexity(Metric):
    """``exp(sum of NLL / number of tokens)`` over everything seen, summed over ranks first.

    Averaging per-batch (or per-rank) perplexities would weight short batches wrongly and is not
    the corpus perplexity; summing NLL and token counts, then dividing once, is.
    """

    full_state_update = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("nll_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, nll: Tensor) -> None:
        """``nll``: per-token negative log-likelihoods in nats, any shape."""
        self.nll_sum += nll.detach().double().sum()
        self.tokens += nll.numel()

    def compute(self) -> Tensor:
        return torch.exp(self.nll_sum / self.tokens.clamp_min(1)).float()


def bits_per_token(ppl: float | Tensor) -> float:
    return math.log2(float(ppl))
