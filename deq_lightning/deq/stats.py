"""What a solve reports: per-sample steps, residuals, traces and why it stopped."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import IntEnum

import torch
from torch import Tensor


class Status(IntEnum):
    """Per-sample outcome of a solve. Anything but CONVERGED means the best iterate was returned."""

    CONVERGED = 0
    MAX_ITER = 1
    DIVERGED = 2
    NONFINITE = 3


@dataclass
class SolverStats:
    """Diagnostics of one batched solve.

    Per-sample tensors have shape ``(batch,)``; traces have shape ``(steps + 1, batch)`` where row
    ``k`` is the residual of iterate ``k``. ``abs_res``/``rel_res`` are the residuals of the
    *returned* iterate (the lowest one seen), and ``nstep`` is the iteration it was reached at.
    ``steps`` is how many evaluations of f each sample actually ran before it stopped (converged,
    frozen or out of budget). The two differ when a solver oscillates: a sample that ran its whole
    budget but returns an early iterate has ``nstep`` small and ``steps == max_iter``.
    """

    solver: str
    stop_mode: str
    tol: float
    max_iter: int
    nstep: Tensor
    abs_res: Tensor
    rel_res: Tensor
    status: Tensor
    steps: Tensor
    abs_trace: Tensor
    rel_trace: Tensor
    nfe: int
    fallbacks: int = 0

    @property
    def residual(self) -> Tensor:
        """The residual the stopping rule looks at."""
        return self.rel_res if self.stop_mode == "rel" else self.abs_res

    @property
    def trace(self) -> Tensor:
        return self.rel_trace if self.stop_mode == "rel" else self.abs_trace

    @property
    def converged(self) -> Tensor:
        return self.status == Status.CONVERGED

    @property
    def diverged(self) -> Tensor:
        return self.status == Status.DIVERGED

    @property
    def nonfinite(self) -> Tensor:
        return self.status == Status.NONFINITE

    @property
    def stop_reason(self) -> str:
        """One line for logs: ``converged``, or what held the unconverged samples back."""
        counts = {s: int((self.status == s).sum()) for s in Status}
        if counts[Status.CONVERGED] == self.status.numel():
            return "converged"
        parts = [
            f"{counts[s]}/{self.status.numel()} {s.name.lower()}"
            for s in (Status.NONFINITE, Status.DIVERGED, Status.MAX_ITER)
            if counts[s]
        ]
        return ", ".join(parts)

    def metrics(self, prefix: str) -> dict[str, float]:
        """Batch means as floats, named ``{prefix}nstep`` etc., ready for a logger."""
        return {
            f"{prefix}nstep": self.nstep.float().mean().item(),
            f"{prefix}steps": self.steps.float().mean().item(),
            f"{prefix}abs_res": self.abs_res.float().mean().item(),
            f"{prefix}rel_res": self.rel_res.float().mean().item(),
            f"{prefix}converged": self.converged.float().mean().item(),
            f"{prefix}nfe": float(self.nfe),
        }


@dataclass
class DEQStats:
    """Diagnostics of one DEQ call: the forward solve and, once backward has run, the adjoint solve.

    ``jac_loss``, ``residual_loss`` (both differentiable) and ``spectral_radius`` are filled only
    when requested.
    """

    forward: SolverStats
    backward: SolverStats | None = None
    jac_loss: Tensor | None = None
    residual_loss: Tensor | None = None
    spectral_radius: Tensor | None = None
    mode: str = "deq"
    extra: dict = field(default_factory=dict)

    @property
    def nstep(self) -> Tensor:
        return self.forward.nstep

    @property
    def abs_res(self) -> Tensor:
        return self.forward.abs_res

    @property
    def rel_res(self) -> Tensor:
        return self.forward.rel_res

    def metrics(self) -> dict[str, float]:
        out = self.forward.metrics("fwd_")
        if self.backward is not None:
            out.update(self.backward.metrics("bwd_"))
        if self.jac_loss is not None:
            out["jac_loss"] = self.jac_loss.detach().float().item()
        if self.residual_loss is not None:
            out["residual_loss"] = self.residual_loss.detach().float().item()
        if self.spectral_radius is not None:
            out["spectral_radius"] = self.spectral_radius.float().mean().item()
        return out


def empty_trace(batch: int, device: torch.device) -> Tensor:
    return torch.zeros(0, batch, device=device)
