"""Small DEQ models whose convergence is known in advance, for tests of the DEQ bookkeeping."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from deq_lightning.deq import DEQ
from deq_lightning.models.contract import ModelOutput


class LinearDEQClassifier(nn.Module):
    """``z* = gain * Q z* + U x`` with a fixed orthogonal ``Q``: a contraction for ``gain < 1``
    (every solver converges), an expansion for ``gain > 1`` (plain iteration diverges, whatever
    the training does to the trainable ``U`` and head)."""

    def __init__(
        self, in_features: int, num_classes: int, width: int = 16, gain: float = 0.5, deq=None
    ) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        q, _ = torch.linalg.qr(torch.randn(width, width, generator=g))
        self.register_buffer("transition", gain * q)
        self.inject = nn.Linear(in_features, width)
        self.head = nn.Linear(width, num_classes)
        self.deq = DEQ(**(deq or {}))

    def forward(self, x: Tensor) -> ModelOutput:
        u = self.inject(x.flatten(1))
        z, stats = self.deq(lambda z: z @ self.transition.T + u, torch.zeros_like(u))
        return ModelOutput(self.head(z), stats)
