"""How gradients reach the parameters of f through an equilibrium: the backward modes.

Every mode receives the flat layer ``f`` and the solver's (graph-free) fixed point ``z*`` and
returns the DEQ's output with a graph attached:

* ``implicit``: output ``f(z*)``; its backward solves the adjoint fixed point
  ``y = y J_f(z*) + dL/dz`` with a solver of its own (its own tol/max_iter, early exit) and passes
  ``y`` through that one application of f. Exact at the fixed point, memory of one f call.
* ``phantom``: ``steps`` damped steps ``z <- (1 - tau) z + tau f(z)`` from ``z*`` with plain
  backprop (DEQ-Flow's phantom gradient); approaches ``implicit`` as ``steps`` grows.
* ``one_step``: ``f(z*)`` with plain backprop (Jacobian-free; phantom with one step and tau 1).
* ``unrolled``: no solver at all; ``steps`` applications of f from ``z0`` with plain backprop, the
  thesis's shallow pre-training and the explicit reference.

The implicit gradient is an ``autograd.Function`` that owns its graph, not a hook registered on a
shared tensor, so a DEQ may be called any number of times before one backward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from .kit import FlatFn, Option, Registry, in_range, integer
from .solvers import COMMON_OPTIONS, SolverStats, check_solver_options, run_flat
from .stats import DEQStats, Status

# The adjoint solve runs while the training graph is alive, so its history counts towards the
# step's peak memory: a shorter Anderson history there (5 instead of the forward's 9) keeps an
# implicit step at ~12% of 40 unrolled steps on the conv cell of bench/solvers.py, at a few more
# (cheap, early-stopping) VJPs.
IMPLICIT_SOLVER_DEFAULTS: dict[str, dict] = {"anderson": {"m": 5}}


@dataclass
class Attached:
    """An output with gradient, plus ``(f(z), z)`` when the mode built them (for Jacobians)."""

    z: Tensor
    fz: Tensor | None = None
    z_in: Tensor | None = None


@dataclass(frozen=True)
class BackwardMode:
    """A way to attach gradients: its options (typed, with defaults and checks), whether it runs
    the forward solver (``solves``), and ``attach(f, z*, opts, stats)``. ``check_extra``
    replaces the plain option check (``implicit`` checks its inner solver's options too)."""

    name: str
    options: dict[str, Option]
    solves: bool
    attach: Callable[[FlatFn, Tensor, dict, DEQStats], Attached] | None = None
    check_extra: Callable[[dict], dict] | None = None

    @property
    def defaults(self) -> dict:
        return {k: o.default for k, o in self.options.items()}

    def check(self, opts: dict) -> dict:
        if self.check_extra is not None:
            return self.check_extra(opts)
        unknown = sorted(set(opts) - set(self.options))
        if unknown:
            accepted = ", ".join(self.options) or "no options"
            raise ValueError(
                f"unknown backward_opts {unknown} for backward '{self.name}'; "
                f"it accepts: {accepted}"
            )
        full = {**self.defaults, **opts}
        for key, option in self.options.items():
            option.validate(f"backward_opts.{key}", full[key])
        return full


_MODES: Registry[BackwardMode] = Registry("backward mode", "modes")


def register_backward(mode: BackwardMode) -> BackwardMode:
    return _MODES.add(mode.name, mode)


def list_backwards() -> list[str]:
    return _MODES.names()


def get_backward(name: str) -> BackwardMode:
    return _MODES.get(name)


# ----------------------------------------------------------------------------------------------
# implicit
# ----------------------------------------------------------------------------------------------


@dataclass
class _Adjoint:
    fz: Tensor
    z_in: Tensor
    solver: str
    opts: dict
    stats: DEQStats


class _ImplicitGrad(torch.autograd.Function):
    """Identity on ``f(z*)`` whose backward replaces dL/dz by the adjoint fixed point."""

    @staticmethod
    def forward(ctx, fz: Tensor, adjoint: _Adjoint) -> Tensor:
        ctx.adjoint = adjoint
        return fz.clone()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        adj: _Adjoint = ctx.adjoint

        def step(y: Tensor) -> Tensor:
            (vjp,) = torch.autograd.grad(adj.fz, adj.z_in, y, retain_graph=True)
            return vjp + grad

        res = run_flat(adj.solver, step, grad, adj.opts)
        adj.stats.backward = res.stats
        return res.z, None


def _check_implicit(opts: dict) -> dict:
    defaults = get_backward("implicit").defaults
    solver = opts.get("solver", defaults["solver"])
    full = {**defaults, **IMPLICIT_SOLVER_DEFAULTS.get(solver, {}), **opts}
    full.pop("solver")
    try:
        checked = check_solver_options(solver, full)
    except ValueError as e:
        raise ValueError(f"backward_opts: {e}") from None
    return {"solver": solver, **checked}


def _attach_implicit(f: FlatFn, z: Tensor, opts: dict, stats: DEQStats) -> Attached:
    if not torch.is_grad_enabled():
        return Attached(f(z))
    z_in = z.detach().requires_grad_()
    fz = f(z_in)
    solver_opts = {k: v for k, v in opts.items() if k != "solver"}
    out = _ImplicitGrad.apply(fz, _Adjoint(fz, z_in, opts["solver"], solver_opts, stats))
    return Attached(out, fz, z_in)


# The adjoint solver's budget and tolerance; its other options go in ``solver_opts`` of the
# config (``backward.solver_opts.m``), which the DEQ receives as further ``backward_opts``.
_IMPLICIT_OPTIONS = {
    "solver": Option("anderson", str),
    "max_iter": replace(COMMON_OPTIONS["max_iter"], default=100),
    "tol": replace(COMMON_OPTIONS["tol"], default=1e-6),
    "stop_mode": COMMON_OPTIONS["stop_mode"],
}
register_backward(
    BackwardMode("implicit", _IMPLICIT_OPTIONS, True, _attach_implicit, _check_implicit)
)


# ----------------------------------------------------------------------------------------------
# phantom, one_step
# ----------------------------------------------------------------------------------------------


def _attach_phantom(f: FlatFn, z: Tensor, opts: dict, stats: DEQStats) -> Attached:
    z, tau = z.detach(), opts["tau"]
    for _ in range(opts["steps"]):
        fz = f(z)
        z = fz if tau == 1 else torch.lerp(z, fz, tau)
    return Attached(z)


def _attach_one_step(f: FlatFn, z: Tensor, opts: dict, stats: DEQStats) -> Attached:
    return Attached(f(z.detach()))


_STEPS = Option(5, int, integer(1))
_PHANTOM_OPTIONS = {"steps": _STEPS, "tau": Option(0.8, float, in_range(0, 1, lo_open=True))}
register_backward(BackwardMode("phantom", _PHANTOM_OPTIONS, True, _attach_phantom))
register_backward(BackwardMode("one_step", {}, True, _attach_one_step))
register_backward(BackwardMode("unrolled", {"steps": replace(_STEPS, default=2)}, False))


# ----------------------------------------------------------------------------------------------
# unrolled (no solver)
# ----------------------------------------------------------------------------------------------


def unroll(
    f: FlatFn, x0: Tensor, steps: int, record: list[int], tol: float, stop_mode: str
) -> tuple[list[Tensor], SolverStats]:
    """``steps`` applications of f with a graph; residuals come free from consecutive iterates."""
    z, states, abs_tr, rel_tr = x0, [], [], []
    for k in range(steps):
        if k in record:
            states.append(z)
        fz = f(z)
        with torch.no_grad():
            abs_res = (fz - z).norm(dim=1)
            abs_tr.append(abs_res)
            rel_tr.append(abs_res / (fz.norm(dim=1) + 1e-9))
        z = fz
    states.append(z)
    res = rel_tr[-1] if stop_mode == "rel" else abs_tr[-1]
    status = torch.where(res < tol, int(Status.CONVERGED), int(Status.MAX_ITER))
    stats = SolverStats(
        solver="unrolled",
        stop_mode=stop_mode,
        tol=tol,
        max_iter=steps,
        nstep=torch.full_like(status, steps),
        abs_res=abs_tr[-1],
        rel_res=rel_tr[-1],
        status=status,
        steps=torch.full_like(status, steps),
        abs_trace=torch.stack(abs_tr),
        rel_trace=torch.stack(rel_tr),
        nfe=steps,
    )
    return states, stats


__all__ = [
    "Attached",
    "BackwardMode",
    "get_backward",
    "list_backwards",
    "register_backward",
    "unroll",
]
