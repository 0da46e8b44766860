"""Residual quantiles over an epoch of solves, exact across DDP ranks.

A batch mean of the residual hides what matters for an equilibrium model: whether *most* samples
are at their fixed point and how bad the worst are. Keeping every residual of an epoch would grow
with the data; a histogram over log-spaced bins keeps memory constant, adds over ranks exactly,
and gives any quantile to within one bin (20 bins per decade: about 12%, far finer than the
decades that separate a converged solve from an unconverged one).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import MeanMetric, Metric

LOG10_LO, LOG10_HI, BINS_PER_DECADE = -12, 4, 20
N_BINS = (LOG10_HI - LOG10_LO) * BINS_PER_DECADE


class ResidualQuantile(Metric):
    """The ``q``-quantile of per-sample residuals seen since the last reset (``q=1``: the maximum).

    Residuals below ``1e-12`` count in the first bin, above ``1e4`` and non-finite ones in the
    last: a NaN residual reads as "very large", never as "converged". The maximum is exact; other
    quantiles are interpolated log-linearly inside their bin.
    """

    full_state_update = False

    def __init__(self, q: float, **kwargs) -> None:
        super().__init__(**kwargs)
        if not 0.0 < q <= 1.0:
            raise ValueError(f"q must be in (0, 1], got {q}")
        self.q = q
        self.add_state("counts", torch.zeros(N_BINS, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("peak", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="max")

    def update(self, residual: Tensor) -> None:
        r = residual.detach().double().reshape(-1)
        r = torch.where(torch.isfinite(r), r, torch.inf)
        self.peak = torch.maximum(self.peak, r.max()) if r.numel() else self.peak
        pos = (torch.log10(r.clamp(min=10.0**LOG10_LO, max=10.0**LOG10_HI)) - LOG10_LO) * (
            BINS_PER_DECADE
        )
        idx = pos.floor().long().clamp(0, N_BINS - 1)
        self.counts += torch.bincount(idx, minlength=N_BINS).to(self.counts.dtype)

    def compute(self) -> Tensor:
        total = self.counts.sum()
        if total == 0:
            return torch.tensor(float("nan"))
        if self.q >= 1.0:
            return self.peak.float()
        target = self.q * total
        cum = self.counts.cumsum(0)
        b = int(torch.searchsorted(cum, target))
        below = cum[b - 1] if b > 0 else cum.new_zeros(())
        frac = ((target - below) / self.counts[b].clamp_min(1e-30)).clamp(0, 1)
        value = 10.0 ** (LOG10_LO + (b + frac) / BINS_PER_DECADE)
        return torch.minimum(value, self.peak).float()


def equilibrium_metrics() -> torch.nn.ModuleDict:
    """What every DEQ task logs about its forward solves, per stage, as ``{stage}/fwd_{name}``.

    ``converged``: fraction of samples whose solve met the tolerance; ``steps``: evaluations of f
    run per sample; ``res_p50``/``res_p90``/``res_max``: quantiles of the stopping residual.
    All are over the whole epoch and over every process, weighted per sample.
    """
    return torch.nn.ModuleDict(
        {
            "converged": MeanMetric(),
            "steps": MeanMetric(),
            "res_p50": ResidualQuantile(0.5),
            "res_p90": ResidualQuantile(0.9),
            "res_max": ResidualQuantile(1.0),
        }
    )
