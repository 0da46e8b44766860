"""Seeded contractive maps shared by the core tests."""

from __future__ import annotations

import torch
from torch import nn


def spectral_scaled(w: torch.Tensor, norm: float) -> torch.Tensor:
    return w * (norm / torch.linalg.matrix_norm(w, 2))


class TanhCell(nn.Module):
    """z -> tanh(W z + U x) with ||W||_2 = ``norm``: a contraction for norm < 1."""

    def __init__(self, d: int = 16, norm: float = 0.9, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(spectral_scaled(torch.randn(d, d, generator=g, dtype=dtype), norm))
        self.u = nn.Parameter(torch.randn(d, d, generator=g, dtype=dtype) / d**0.5)

    def forward(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(z @ self.w.T + x @ self.u.T)


class PairCell(nn.Module):
    """A two-tensor state of different shapes, coupled both ways (like DEQ-Flow's (h, flow))."""

    def __init__(self, dtype: torch.dtype = torch.float64) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.a = nn.Parameter(spectral_scaled(torch.randn(12, 12, generator=g, dtype=dtype), 0.6))
        self.b = nn.Parameter(torch.randn(12, 6, generator=g, dtype=dtype) * 0.1)
        self.c = nn.Parameter(torch.randn(6, 12, generator=g, dtype=dtype) * 0.1)

    def forward(self, z: tuple[torch.Tensor, torch.Tensor], x: torch.Tensor):
        h, v = z  # h: (B, 3, 4), v: (B, 6)
        hf = h.flatten(1)
        h_new = torch.tanh(hf @ self.a.T + v @ self.b.T + x).view_as(h)
        v_new = 0.5 * torch.sin(hf @ self.c.T) + 0.3 * v
        return h_new, v_new


def linear_problem(d: int = 64, batch: int = 4, top: float = 0.99, dtype=torch.float64, seed=0):
    """f(z) = A z + b with A symmetric, eigenvalues in [-0.5, top]: ill-conditioned for top -> 1."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=dtype))
    a = (q * torch.linspace(-0.5, top, d, dtype=dtype)) @ q.T
    b = torch.randn(batch, d, generator=g, dtype=dtype)
    return (lambda z: z @ a.T + b), a, b
