"""Terms at an equilibrium: the Hutchinson Jacobian regulariser, the residual term and a
spectral-radius estimate.

All take ``fz = f(z)``; the Jacobian tools need it built with ``z.requires_grad_()`` and use vector-Jacobian products only, so
they cost a few backward passes through one application of f, never a full Jacobian. f is assumed
to act on each sample separately (its Jacobian is block-diagonal over the batch), which is what
makes one batched VJP give every sample's estimate.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .state import State


def _per_sample_norm(x: Tensor) -> Tensor:
    return x.flatten(1).norm(dim=1)


def jac_loss_estimate(fz: Tensor, z: Tensor, samples: int = 1, create_graph: bool = True) -> Tensor:
    """Unbiased Hutchinson estimate of ``mean_b ||J_f(z_b)||_F^2 / d`` (the thesis's JR term).

    ``E_v ||v^T J||^2 = ||J||_F^2`` for ``v ~ N(0, I)``; dividing by the per-sample dimension ``d``
    makes the weight of the term independent of the state size. Differentiable (``create_graph``)
    so it can be added to the training loss.
    """
    batch = z.shape[0]
    d = z[0].numel()
    total = fz.new_zeros(())
    for _ in range(samples):
        v = torch.randn_like(fz)
        (vj,) = torch.autograd.grad(fz, z, v, create_graph=create_graph, retain_graph=True)
        total = total + vj.pow(2).sum()
    return total / (samples * batch * d)


def spectral_radius(fz: Tensor, z: Tensor, n_iter: int = 50) -> Tensor:
    """Power-method estimate of each sample's spectral radius ``rho(J_f(z))``, shape ``(batch,)``.

    rho < 1 is what makes plain iteration (and the adjoint solve) converge; the thesis logs it at
    validation to watch a DEQ drift towards instability.
    """
    v = torch.randn_like(z)
    v = v / _per_sample_norm(v).view(-1, *[1] * (v.dim() - 1))
    est = torch.zeros(z.shape[0], device=z.device, dtype=z.dtype)
    for _ in range(n_iter):
        (vj,) = torch.autograd.grad(fz, z, v, retain_graph=True)
        est = _per_sample_norm(vj)
        v = vj / est.clamp_min(1e-30).view(-1, *[1] * (vj.dim() - 1))
    return est.detach()


def residual_loss(fz: State, z: State) -> Tensor:
    """Mean over the batch of the relative residual ``||f(z) - z|| / ||f(z)||`` with ``z`` held
    fixed: its gradient moves f's parameters (and its input injection) so that the state the
    solver reached is a fixed point. It is the solver's ``rel`` stopping test, so the term trains
    what ``fwd_converged`` checks. ``fz`` and ``z`` are states (a tensor or a tuple of tensors,
    batch first)."""
    fz_flat = torch.cat([_wide(a.flatten(1)) for a in _parts(fz)], 1)
    z_flat = torch.cat([_wide(b.detach().flatten(1)) for b in _parts(z)], 1)
    return ((fz_flat - z_flat).norm(dim=1) / (fz_flat.norm(dim=1) + 1e-8)).mean()


def _wide(t: Tensor) -> Tensor:
    """At least float32 (a bf16 state's residual underflows), float64 kept."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _parts(state: State) -> tuple[Tensor, ...]:
    return (state,) if isinstance(state, Tensor) else tuple(state)
