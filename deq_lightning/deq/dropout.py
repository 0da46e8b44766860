"""Variational (locked) dropout: one mask per DEQ forward, shared by every solver step.

Ordinary dropout inside f would draw a new mask at every solver step, so f would change from step
to step and have no fixed point. Here the mask is drawn on the first call of a DEQ forward, on the
input's device and with the input's shape (size 1 along ``shared_dims``), and then reused by every
step, by the gradient steps and by the implicit backward.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from .scope import active_index, per_forward


class VariationalDropout(nn.Module):
    """Dropout with a mask fixed for a whole DEQ forward.

    ``shared_dims`` are the dimensions the mask is broadcast along: ``(2, 3)`` drops whole channels
    of an image state ``(B, C, H, W)``, ``(2,)`` locks a mask over time for ``(B, d, L)``, and
    ``()`` gives an element-wise mask (attention weights).
    """

    def __init__(self, p: float = 0.0, shared_dims: Sequence[int] = ()) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout p must be in [0, 1), got {p}")
        self.p = float(p)
        self.shared_dims = tuple(shared_dims)

    def extra_repr(self) -> str:
        return f"p={self.p}, shared_dims={self.shared_dims}"

    def _draw(self, x: Tensor) -> Tensor:
        shape = [1 if d in self.shared_dims else s for d, s in enumerate(x.shape)]
        keep = 1.0 - self.p
        return torch.empty(shape, device=x.device, dtype=x.dtype).bernoulli_(keep).div_(keep)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        mask = per_forward(self, "mask", lambda: self._draw(x))
        index = active_index()
        if index is not None and mask.dim() and mask.shape[0] not in (1, x.shape[0]):
            mask = mask[index]  # batch compaction: f runs on the rows still being solved
        if mask.dim() != x.dim() or any(m not in (1, s) for m, s in zip(mask.shape, x.shape)):
            raise RuntimeError(
                f"VariationalDropout got an input of shape {tuple(x.shape)} after drawing a mask "
                f"of shape {tuple(mask.shape)} in the same DEQ forward; "
                "f must keep the state's shape"
            )
        return x * mask.to(x.dtype)
