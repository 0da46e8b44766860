"""Batched fixed-point solvers for z = f(z): plain iteration, Anderson acceleration, Broyden.

All solvers share one contract, so that they can be swapped by name from a config:

* they work on a flat ``(batch, dim)`` state (see :mod:`.state`) and never build an autograd graph;
* every sample has its own residual and stops on its own: a converged sample is frozen while the
  rest of the batch keeps iterating, and a sample whose residual turns NaN/Inf or grows by
  ``diverge_factor`` is frozen at its best iterate and flagged, so one bad sample
  neither raises nor spoils the others;
* they return the lowest-residual iterate of each sample, never merely the last one;
* a sample is flagged as diverged once its absolute residual exceeds ``diverge_factor`` times its
  initial one (transient spikes of Anderson and Broyden below that are normal and not flagged);
* solver memory grows with the steps actually taken (or a fixed history), never with ``max_iter``;
* with ``compact`` (batch compaction), samples that stop leave the active batch: later steps
  evaluate f, and do the solver's own arithmetic, only on the rows still being solved. f must
  opt in by accepting an ``index`` keyword (see :func:`takes_index`); for any other f the
  option changes nothing and stopped samples are frozen as described above.

``max_iter`` counts function evaluations. ``stats.nstep[b]`` is the number of evaluations after
which sample ``b``'s returned iterate had its residual measured.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any, NamedTuple

import torch
from torch import Tensor

from .kit import (
    AndersonMixer,
    FlatFn,
    FlatResult,
    Monitor,
    Option,
    Recorder,
    Registry,
    Run,
    above,
    in_range,
    integer,
    one_of,
    optional,
    positive,
    rowdot,
)
from .scope import batch_index
from .state import State, StateSpec
from .stats import SolverStats

# A registered solver is called as ``fn(f, x0, run, **its_options)`` (see :class:`~.kit.Run`).
SolverFn = Callable[..., FlatResult]

STOP_MODES = ("abs", "rel")
# ``compact``: "on" drops stopped samples from the active batch, "off" freezes them in place,
# "eval" is "on" when the DEQ layer is in eval mode and "off" in training (plain ``solve()``
# calls count as evaluation). Only f's that accept ``index`` are ever compacted.
COMPACT_MODES = ("off", "eval", "on")
# Options every solver takes (run_checked turns them into the Monitor and the budget).
COMMON_OPTIONS = {
    "max_iter": Option(50, int, integer(1)),
    "tol": Option(1e-3, float, positive),
    "stop_mode": Option("rel", str, one_of(STOP_MODES)),
    "diverge_factor": Option(1e3, float, above(1)),
    "compact": Option("eval", str, one_of(COMPACT_MODES)),
}
COMMON_DEFAULTS = {k: o.default for k, o in COMMON_OPTIONS.items()}


class SolverSpec(NamedTuple):
    fn: SolverFn
    options: dict[str, Option]  # its own, beside COMMON_OPTIONS


_SOLVERS: Registry[SolverSpec] = Registry("solver", "solvers")


def register_solver(name: str, **options: Option) -> Callable[[SolverFn], SolverFn]:
    """Register a solver under ``name`` (used by configs: ``solver=name``) with its own options.

    The function is called as ``fn(f, x0, run, **options)``: ``run`` (a :class:`~.kit.Run`)
    holds the monitor set up from the common options (:data:`COMMON_OPTIONS`), the recorder and
    the budget, and each declared option arrives as a keyword argument, validated and defaulted.
    """

    def deco(fn: SolverFn) -> SolverFn:
        params = inspect.signature(fn).parameters
        takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
        missing = [] if takes_any else sorted(set(options) - set(params))
        if missing:
            raise TypeError(f"solver '{name}' declares options {missing} that {fn.__name__} lacks")
        _SOLVERS.add(name, SolverSpec(fn, dict(options)))
        return fn

    return deco


def list_solvers() -> list[str]:
    return _SOLVERS.names()


def get_solver(name: str) -> SolverFn:
    return _SOLVERS.get(name).fn


def _options(name: str) -> dict[str, Option]:
    return {**COMMON_OPTIONS, **_SOLVERS.get(name).options}


def solver_options(name: str) -> dict[str, object]:
    """All options ``name`` accepts with their defaults (common ones first)."""
    return {k: o.default for k, o in _options(name).items()}


def solver_option_types(name: str) -> dict[str, Any]:
    """The type of each option of ``name`` (for config schemas), in :func:`solver_options` order."""
    return {k: o.type for k, o in _options(name).items()}


def check_solver_options(name: str, opts: dict) -> dict:
    """Reject unknown keys and impossible values with the key's name; return opts with defaults."""
    known = _options(name)
    unknown = sorted(set(opts) - set(known))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for solver '{name}'; it accepts: {', '.join(known)}"
        )
    full = {**solver_options(name), **opts}
    for key, option in known.items():
        option.validate(key, full[key])
    return full


# ----------------------------------------------------------------------------------------------
# Solvers
# ----------------------------------------------------------------------------------------------


@register_solver("fixed_point", damping=Option(0.0, float, in_range(0.0, 0.99)))
def fixed_point(f: FlatFn, x0: Tensor, run: Run, damping: float) -> FlatResult:
    """Picard iteration ``x <- (1 - damping) f(x) + damping x``."""
    mon, rec, x = run.mon, run.rec, x0
    for k in range(run.max_iter):
        rec(k, x)
        fx = mon.evaluate(f, x)
        if not mon.observe(k, x, fx):
            break
        if mon.keep is not None:
            x, fx = mon.shrink(x, fx)
        step = fx if damping == 0 else torch.lerp(fx, x, damping)
        x = mon.hold(step)
    return run.result("fixed_point", k + 1)


# Anderson's options, shared with HyperAnderson (:mod:`.hyper`).
ANDERSON_OPTIONS = {
    "m": Option(9, int, integer(1)),
    "lam": Option(1e-4, float, in_range(0.0, 1e6)),
    "beta": Option(1.0, float, in_range(0.0, 2.0, lo_open=True)),
}


@register_solver("anderson", **ANDERSON_OPTIONS)
def anderson(f: FlatFn, x0: Tensor, run: Run, m: int, lam: float, beta: float) -> FlatResult:
    """Anderson acceleration with a history of ``m`` and mixing ``beta``.

    Each step mixes the last ``m`` iterates with the weights of :class:`~.kit.AndersonMixer`
    (relative ridge ``lam``, per-sample fallback to a plain step).

    The default history ``m=9`` needs as few evaluations as the best point of a grid over
    torchdeq's Anderson (m, lam, tau) on every problem of ``bench/solvers.py``; m=5 took up to 3
    more. It costs 2m state-sized buffers during the forward solve only.
    """
    b, d = x0.shape
    xs = x0.new_empty(b, m, d)  # iterates x_i
    gs = x0.new_empty(b, m, d)  # residuals g_i
    mixer = AndersonMixer(x0, m, lam)
    mon, rec, x = run.mon, run.rec, x0.clone()
    for k in range(run.max_iter):
        rec(k, x)
        fx = mon.evaluate(f, x)
        slot, n = k % m, min(k + 1, m)
        g = torch.sub(fx, x, out=gs[:, slot])
        if not mon.observe(k, x, fx, g):
            break
        if mon.keep is not None:
            x, xs, gs = mon.shrink(x, xs, gs)
            mixer.shrink(mon)
            b, g = x.shape[0], gs[:, slot]
        xs[:, slot].copy_(x)
        alpha = mixer.weights(gs[:, :n], g, slot)[0][:, None]  # (B, 1, n)
        # x_next = sum_i alpha_i (x_i + beta g_i), written into x without (B, n, D) temporaries
        torch.bmm(alpha, xs[:, :n], out=x[:, None])
        x.view(b, 1, d).baddbmm_(alpha, gs[:, :n], alpha=beta)
        x = mon.hold(x)
    return run.result("anderson", k + 1, mixer.fallbacks)


class _LowRank:
    """The Broyden inverse-Jacobian estimate ``-I + U^T V``, built from rank-one updates.

    Updates are stored as rows in chunks of ``CHUNK`` that are added as updates arrive, so memory
    follows the steps actually taken (never ``max_iter``) and no buffer is ever copied to grow.
    With ``memory`` set, the estimate restarts from ``-I`` once ``memory`` updates are stored
    (restarted Broyden, reusing its chunks); dropping only the oldest update instead breaks the
    secant conditions the newer updates were built on and diverges on ill-conditioned maps.
    """

    CHUNK = 8

    def __init__(self, like: Tensor, memory: int | None) -> None:
        self.like, self.memory = like, memory
        self.us: list[Tensor] = []
        self.vs: list[Tensor] = []
        self.n = 0

    def _parts(self):
        left = self.n
        for u, v in zip(self.us, self.vs):
            if left <= 0:
                return
            used = min(left, u.shape[1])
            yield u[:, :used], v[:, :used]
            left -= used

    def matvec(self, x: Tensor) -> Tensor:
        """``(-I + U^T V) x``."""
        out = -x
        for u, v in self._parts():
            out.view(x.shape[0], 1, -1).baddbmm_(rowdot(v, x), u)
        return out

    def rmatvec(self, x: Tensor) -> Tensor:
        """``x^T (-I + U^T V)``."""
        out = -x
        for u, v in self._parts():
            out.view(x.shape[0], 1, -1).baddbmm_(rowdot(u, x), v)
        return out

    def shrink(self, keep: Tensor) -> None:
        """Keep only the rows ``keep`` (batch compaction)."""
        self.us = [u[keep] for u in self.us]
        self.vs = [v[keep] for v in self.vs]
        self.like = self.like[keep]

    def append(self, u: Tensor, v: Tensor) -> bool:
        """Store a rank-one update; returns True when the estimate restarted from -I first."""
        restarted = self.memory is not None and self.n >= self.memory
        if restarted:
            self.n = 0
        chunk, pos = divmod(self.n, self.CHUNK)
        if chunk == len(self.us):
            size = self.CHUNK if self.memory is None else min(self.CHUNK, self.memory - self.n)
            self.us.append(self.like.new_empty(self.like.shape[0], size, self.like.shape[1]))
            self.vs.append(self.like.new_empty(self.like.shape[0], size, self.like.shape[1]))
        self.us[chunk][:, pos] = u
        self.vs[chunk][:, pos] = v
        self.n += 1
        return restarted

    @property
    def stored(self) -> int:
        """Update rows allocated (memory in use, in units of one state)."""
        return sum(u.shape[1] for u in self.us)


@register_solver("broyden", memory=Option(None, int | None, optional(integer(1))))
def broyden(f: FlatFn, x0: Tensor, run: Run, memory: int | None) -> FlatResult:
    """Broyden's ("good") method on g(x) = f(x) - x, with a low-rank inverse Jacobian.

    ``memory`` caps the number of rank-one updates kept (the estimate restarts when it is full);
    ``None`` keeps all of them, which still costs only the steps actually taken.
    """
    inv = _LowRank(x0, memory)
    mon, rec, x = run.mon, run.rec, x0.clone()
    rec(0, x)
    gx = f(x) - x
    if not mon.observe(0, x, gx + x, gx):
        return run.result("broyden", 1)
    if mon.keep is not None:
        x, gx = mon.shrink(x, gx)
    update = gx.clone()  # -H g with H = -I
    nfe = 1
    for k in range(1, run.max_iter):
        if mon.all_active:
            dx = update
            x += dx
        else:
            x_new = mon.hold(x + update)
            dx = x_new - x
            x = x_new
        rec(k, x)
        fx = mon.evaluate(f, x)
        nfe += 1
        gx_new = fx - x
        if not mon.observe(k, x, fx, gx_new):
            break
        if mon.keep is not None:
            x, dx, gx, gx_new, update = mon.shrink(x, dx, gx, gx_new, update)
            inv.shrink(mon.keep)
        # Two low-rank products per step: H g_new, and v = H^T dx. H dg follows from
        # H g_old = -update, and the new update from H g_new plus the new rank-one term.
        h_g = inv.matvec(gx_new)
        h_dg = h_g + update
        vt = inv.rmatvec(dx)
        denom = torch.bmm(vt[:, None, :], (gx_new - gx)[:, :, None]).view(-1, 1)
        u = h_dg.neg_().add_(dx).div_(denom)
        ok = (
            torch.isfinite(u).all(1, keepdim=True) & (denom.abs() > 1e-30) & mon.row_active[:, None]
        )
        u, vt = torch.where(ok, u, 0.0), torch.where(ok, vt, 0.0)
        if inv.append(u, vt):
            update = inv.matvec(gx_new).neg_()
        else:
            coef = torch.bmm(vt[:, None, :], gx_new[:, :, None]).view(-1, 1)
            update = h_g.addcmul_(u, coef).neg_()
        gx = gx_new
    return run.result("broyden", nfe)


# ----------------------------------------------------------------------------------------------
# Public entry point
# ----------------------------------------------------------------------------------------------


def autocast_state(device: torch.device) -> tuple[bool, torch.dtype]:
    return torch.is_autocast_enabled(device.type), torch.get_autocast_dtype(device.type)


def takes_index(f: Callable) -> bool:
    """Whether f opted in to batch compaction by accepting an ``index`` keyword.

    The contract: ``f(z, index=idx)`` gets the state rows ``z = z_full[idx]`` (``idx`` a long
    tensor of batch positions, increasing) and must return ``f(z_full)[idx]``; everything f
    closes over that has a batch dimension (the injection, attention memory, a correlation
    volume) is index-selected by f itself. ``f(z)`` (no index) is the whole batch. An f without
    an ``index`` parameter is never compacted. Flat wrappers carry the answer as an attribute.
    """
    known = getattr(f, "takes_index", None)
    if known is not None:
        return bool(known)
    try:
        params = inspect.signature(f).parameters
    except (TypeError, ValueError):  # builtins and some C callables have no signature
        return False
    p = params.get("index")
    return p is not None and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)


def flat_fn(
    f: Callable[[State], State],
    spec: StateSpec,
    autocast: tuple[bool, torch.dtype],
    device: torch.device,
) -> FlatFn:
    """Wrap a structured f as a flat one, run under the caller's autocast (the solver is not).

    The flat f takes ``index`` (batch compaction) exactly when f does (see :func:`takes_index`).
    """
    enabled, dtype = autocast

    def g(x: Tensor, index: Tensor | None = None) -> Tensor:
        ctx = torch.autocast(device.type, dtype=dtype) if enabled else nullcontext()
        with ctx:
            if index is None:
                return spec.flatten(f(spec.unflatten(x)))
            with batch_index(index):
                return spec.flatten(f(spec.unflatten(x), index=index), batch=x.shape[0])

    g.takes_index = takes_index(f)  # type: ignore[attr-defined]
    return g


def run_flat(
    name: str,
    f: FlatFn,
    x0: Tensor,
    opts: dict,
    record: Sequence[int] | None = None,
) -> FlatResult:
    """Run a registered solver on a flat state, validated, with no graph and no autocast.

    ``compact`` "eval" counts as "on" here (a bare solve has no training mode; the DEQ layer
    resolves it first); it takes effect only for an f that accepts ``index``.
    """
    full = check_solver_options(name, opts)
    return run_checked(get_solver(name), f, x0, full, record)


def run_checked(
    fn: SolverFn, f: FlatFn, x0: Tensor, full: dict, record: Sequence[int] | None = None
) -> FlatResult:
    """Run solver function ``fn`` with validated options ``full`` (common ones and its own)."""
    own = dict(full)
    common = {k: own.pop(k) for k in COMMON_OPTIONS}
    compact = common["compact"] != "off" and takes_index(f)
    with torch.no_grad(), torch.autocast(x0.device.type, enabled=False):
        x0 = x0.detach()
        mon = Monitor(x0, common["tol"], common["stop_mode"], common["diverge_factor"], compact)
        return fn(f, x0, Run(mon, Recorder(record, mon), common["max_iter"]), **own)


def solve(
    f: Callable[[State], State],
    z0: State,
    solver: str = "anderson",
    max_iter: int = COMMON_DEFAULTS["max_iter"],
    tol: float = COMMON_DEFAULTS["tol"],
    stop_mode: str = COMMON_DEFAULTS["stop_mode"],
    **solver_opts: object,
) -> tuple[State, SolverStats]:
    """Find z = f(z) from z0 without autograd; return the best iterate and its stats.

    ``z0`` is a tensor or a tuple/list of tensors (batch first); f maps it to the same structure.
    Half-precision states are solved in float32 and returned in their own dtypes.
    """
    spec = StateSpec.of(z0)
    x0 = spec.flatten(z0).detach()
    g = flat_fn(f, spec, autocast_state(x0.device), x0.device)
    opts = dict(solver_opts, max_iter=max_iter, tol=tol, stop_mode=stop_mode)
    res = run_flat(solver, g, x0, opts)
    return spec.unflatten(res.z, cast=True), res.stats
