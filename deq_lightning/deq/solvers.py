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
import math
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import NamedTuple

import torch
from torch import Tensor

from .scope import batch_index
from .state import State, StateSpec
from .stats import SolverStats, Status

FlatFn = Callable[[Tensor], Tensor]
SolverFn = Callable[..., "FlatResult"]

STOP_MODES = ("abs", "rel")
_SOLVERS: dict[str, SolverFn] = {}
# Keyword arguments run_flat passes to every solver that are not options of the config.
_INTERNAL = ("record",)
# Options every solver takes; solver-specific ones are read from each function's signature.
COMMON_DEFAULTS = {
    "max_iter": 50,
    "tol": 1e-3,
    "stop_mode": "rel",
    "diverge_factor": 1e3,
    "compact": "eval",
}
# ``compact``: "on" drops stopped samples from the active batch, "off" freezes them in place,
# "eval" is "on" when the DEQ layer is in eval mode and "off" in training (plain ``solve()``
# calls count as evaluation). Only f's that accept ``index`` are ever compacted.
COMPACT_MODES = ("off", "eval", "on")


class FlatResult(NamedTuple):
    z: Tensor
    stats: SolverStats
    states: list[Tensor]


def register_solver(
    name: str, checks: dict[str, Callable[[dict, str], None]] | None = None
) -> Callable[[SolverFn], SolverFn]:
    """Register a solver under ``name`` (used by configs: ``solver=name``).

    ``checks`` maps a solver-specific option to a validator ``check(opts, key)`` that raises
    ``ValueError`` naming the key (see :func:`check_solver_options`).
    """

    def deco(fn: SolverFn) -> SolverFn:
        if name in _SOLVERS:
            raise ValueError(f"a solver named '{name}' is already registered")
        _SOLVERS[name] = fn
        if checks:
            _SPECIFIC_CHECKS[name] = dict(checks)
        return fn

    return deco


def list_solvers() -> list[str]:
    return sorted(_SOLVERS)


def get_solver(name: str) -> SolverFn:
    try:
        return _SOLVERS[name]
    except KeyError:
        raise ValueError(
            f"unknown solver '{name}'; known solvers: {', '.join(list_solvers())}"
        ) from None


def solver_options(name: str) -> dict[str, object]:
    """All options ``name`` accepts with their defaults (common ones first)."""
    params = inspect.signature(get_solver(name)).parameters
    specific = {
        k: p.default
        for k, p in params.items()
        if p.kind is p.KEYWORD_ONLY and k not in COMMON_DEFAULTS and k not in _INTERNAL
    }
    return {**COMMON_DEFAULTS, **specific}


def check_solver_options(name: str, opts: dict) -> dict:
    """Reject unknown keys and impossible values with the key's name; return opts with defaults."""
    known = solver_options(name)
    unknown = sorted(set(opts) - set(known))
    if unknown:
        raise ValueError(
            f"unknown option(s) {unknown} for solver '{name}'; it accepts: {', '.join(known)}"
        )
    full = {**known, **opts}
    _check_int(full, "max_iter", minimum=1)
    _check_pos(full, "tol")
    if full["stop_mode"] not in STOP_MODES:
        raise ValueError(f"stop_mode must be one of {STOP_MODES}, got {full['stop_mode']!r}")
    if not float(full["diverge_factor"]) > 1:
        raise ValueError(f"diverge_factor must be > 1, got {full['diverge_factor']!r}")
    if full["compact"] not in COMPACT_MODES:
        raise ValueError(f"compact must be one of {COMPACT_MODES}, got {full['compact']!r}")
    for key, check in _SPECIFIC_CHECKS.get(name, {}).items():
        check(full, key)
    return full


def _check_int(opts: dict, key: str, minimum: int) -> None:
    v = opts[key]
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{key} must be an integer >= {minimum}, got {v!r}")


def _check_pos(opts: dict, key: str) -> None:
    v = opts[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
        raise ValueError(f"{key} must be a number > 0, got {v!r}")


def _check_range(lo: float, hi: float, lo_open: bool = False) -> Callable[[dict, str], None]:
    def check(opts: dict, key: str) -> None:
        v = opts[key]
        ok = isinstance(v, (int, float)) and not isinstance(v, bool)
        ok = ok and (lo < v if lo_open else lo <= v) and v <= hi
        bracket = "(" if lo_open else "["
        if not ok:
            raise ValueError(f"{key} must be in {bracket}{lo}, {hi}], got {v!r}")

    return check


def _check_memory(opts: dict, key: str) -> None:
    if opts[key] is not None:
        _check_int(opts, key, minimum=1)


_SPECIFIC_CHECKS: dict[str, dict[str, Callable[[dict, str], None]]] = {
    "fixed_point": {"damping": _check_range(0.0, 0.99)},
    "anderson": {
        "m": lambda o, k: _check_int(o, k, 1),
        "lam": _check_range(0.0, 1e6),
        "beta": _check_range(0.0, 2.0, lo_open=True),
    },
    "broyden": {"memory": _check_memory},
}


# ----------------------------------------------------------------------------------------------
# Shared bookkeeping
# ----------------------------------------------------------------------------------------------


class _Monitor:
    """Per-sample residuals, best iterate, freezing and status; shared by every solver.

    State-sized buffers are updated in place: on CPU a fresh multi-MiB tensor per step costs
    page faults comparable to the arithmetic itself.

    With ``compact`` the solver's tensors hold only the *rows* still being solved
    (``self.rows``, indices into the batch); the records here stay batch-sized. After each
    :meth:`observe`, ``self.keep`` is a boolean mask over the previous rows when some of them
    stopped (the solver then drops them from its own buffers with :meth:`shrink`), else None.
    """

    def __init__(
        self,
        x0: Tensor,
        tol: float,
        stop_mode: str,
        diverge_factor: float,
        compact: bool = False,
    ) -> None:
        b = x0.shape[0]
        self.batch, self.compact = b, compact
        self.rows: Tensor | None = None  # None: every row of the batch
        self.keep: Tensor | None = None
        self.tol, self.stop_mode, self.diverge_factor = tol, stop_mode, diverge_factor
        self.best_x = x0.clone()
        inf = torch.full((b,), math.inf, device=x0.device, dtype=x0.dtype)
        self.best_abs, self.best_rel, self.best_res = inf.clone(), inf.clone(), inf.clone()
        self.best_step = torch.zeros(b, dtype=torch.long, device=x0.device)
        self.status = torch.full((b,), int(Status.MAX_ITER), dtype=torch.long, device=x0.device)
        self.active = torch.ones(b, dtype=torch.bool, device=x0.device)
        self.steps = torch.zeros(b, dtype=torch.long, device=x0.device)
        self.all_active = True
        self.abs_trace: list[Tensor] = []
        self.rel_trace: list[Tensor] = []

    def evaluate(self, f: FlatFn, x: Tensor) -> Tensor:
        """``f`` on the current rows: ``f(x)``, or ``f(x, index=rows)`` once rows have left."""
        return f(x) if self.rows is None else f(x, index=self.rows)

    def _full(self, part: Tensor, fill: Tensor) -> Tensor:
        """A batch-sized vector: ``part`` on the current rows, ``fill`` elsewhere."""
        return part if self.rows is None else fill.index_put((self.rows,), part)

    def expand(self, x: Tensor) -> Tensor:
        """A batch-sized copy of an iterate: the best iterate on rows that have left."""
        return x.clone() if self.rows is None else self.best_x.index_put((self.rows,), x)

    def shrink(self, *tensors: Tensor) -> list[Tensor]:
        """Drop the rows that just stopped (``self.keep``) from the solver's tensors."""
        return [t[self.keep] for t in tensors]

    def observe(self, k: int, x: Tensor, fx: Tensor, gx: Tensor | None = None) -> bool:
        """Record the residual of iterate ``k`` (``gx = fx - x`` if already computed).

        ``x``, ``fx`` and ``gx`` hold the current rows. Returns whether any sample is still
        active.
        """
        gx = fx - x if gx is None else gx
        self.steps += self.active
        abs_res = torch.linalg.vector_norm(gx, dim=1)
        rel_res = abs_res / (torch.linalg.vector_norm(fx, dim=1) + 1e-9)
        # Rows that have left show their best residual (what a frozen sample's trace shows).
        abs_res, rel_res = self._full(abs_res, self.best_abs), self._full(rel_res, self.best_rel)
        self.abs_trace.append(abs_res)
        self.rel_trace.append(rel_res)
        res = rel_res if self.stop_mode == "rel" else abs_res
        finite = torch.isfinite(abs_res) & torch.isfinite(rel_res)
        improved = self.active & finite & (res < self.best_res)
        if self.rows is None:
            torch.where(improved[:, None], x, self.best_x, out=self.best_x)
        else:
            kept = torch.where(improved[self.rows][:, None], x, self.best_x[self.rows])
            self.best_x.index_copy_(0, self.rows, kept)
        self.best_abs = torch.where(improved, abs_res, self.best_abs)
        self.best_rel = torch.where(improved, rel_res, self.best_rel)
        self.best_res = torch.where(improved, res, self.best_res)
        self.best_step = torch.where(improved, k + 1, self.best_step)
        converged = self.active & finite & (res < self.tol)
        nonfinite = self.active & ~finite
        if k == 0:
            self.first_abs = torch.where(finite, abs_res, torch.inf)
        # Divergence is judged on the absolute residual: the relative one stays bounded (-> ~1)
        # while the iterates run off to infinity.
        diverged = self.active & finite & (abs_res > self.diverge_factor * self.first_abs)
        for mask, status in (
            (converged, Status.CONVERGED),
            (nonfinite, Status.NONFINITE),
            (diverged, Status.DIVERGED),
        ):
            self.status = torch.where(mask, int(status), self.status)
        self.active = self.active & ~(converged | nonfinite | diverged)
        n_active = int(self.active.sum())  # the one host sync per step
        n_rows = self.batch if self.rows is None else self.rows.numel()
        self.keep = None
        # Rows leave in groups (a quarter of the rows at least, or all that remain to stop):
        # each compaction copies the solver's history, which costs more than a few f rows.
        stopped = n_rows - n_active
        if self.compact and n_active > 0 and stopped >= max(1, n_rows // 4):
            rows = torch.arange(self.batch, device=x.device) if self.rows is None else self.rows
            self.keep = self.active[rows]
            self.rows = rows[self.keep]
            n_rows = n_active
        self.all_active = n_active == n_rows
        return n_active > 0

    @property
    def row_active(self) -> Tensor:
        """The active flags of the current rows."""
        return self.active if self.rows is None else self.active[self.rows]

    def hold(self, proposal: Tensor) -> Tensor:
        """Next iterate, in place: the proposal for active samples, the best one for frozen ones.

        Under compaction stopped rows are frozen like this until enough of them leave together.
        """
        if not self.all_active:
            best = self.best_x if self.rows is None else self.best_x[self.rows]
            torch.where(self.row_active[:, None], proposal, best, out=proposal)
        return proposal

    def result(
        self, name: str, max_iter: int, nfe: int, states: list[Tensor], fallbacks: int = 0
    ) -> FlatResult:
        stats = SolverStats(
            solver=name,
            stop_mode=self.stop_mode,
            tol=self.tol,
            max_iter=max_iter,
            nstep=self.best_step,
            abs_res=self.best_abs,
            rel_res=self.best_rel,
            status=self.status,
            steps=self.steps,
            abs_trace=torch.stack(self.abs_trace),
            rel_trace=torch.stack(self.rel_trace),
            nfe=nfe,
            fallbacks=fallbacks,
        )
        return FlatResult(self.best_x, stats, states)


class _Recorder:
    """Batch-sized copies of the iterate at chosen steps (for fixed-point correction)."""

    def __init__(self, steps: Sequence[int] | None, mon: _Monitor | None = None) -> None:
        self.steps = set(steps or ())
        self.states: list[Tensor] = []
        self.mon = mon

    def __call__(self, k: int, x: Tensor) -> None:
        if k in self.steps:  # a copy: solvers update x in place
            self.states.append(x.clone() if self.mon is None else self.mon.expand(x))


def _rowdot(rows: Tensor, x: Tensor) -> Tensor:
    """``rows @ x`` per sample, (B, n, D) x (B, D) -> (B, 1, n).

    Written as a row-vector product: on CPU, ``bmm(rows, x[..., None])`` takes a path several
    times slower for the same numbers.
    """
    return torch.bmm(x[:, None, :], rows.transpose(1, 2))


# ----------------------------------------------------------------------------------------------
# Solvers
# ----------------------------------------------------------------------------------------------


@register_solver("fixed_point")
def fixed_point(
    f: FlatFn,
    x0: Tensor,
    *,
    max_iter: int,
    tol: float,
    stop_mode: str,
    diverge_factor: float,
    compact: bool = False,
    record: Sequence[int] | None = None,
    damping: float = 0.0,
) -> FlatResult:
    """Picard iteration ``x <- (1 - damping) f(x) + damping x``."""
    mon = _Monitor(x0, tol, stop_mode, diverge_factor, compact)
    rec = _Recorder(record, mon)
    x = x0
    for k in range(max_iter):
        rec(k, x)
        fx = mon.evaluate(f, x)
        if not mon.observe(k, x, fx):
            break
        if mon.keep is not None:
            x, fx = mon.shrink(x, fx)
        step = fx if damping == 0 else torch.lerp(fx, x, damping)
        x = mon.hold(step)
    return mon.result("fixed_point", max_iter, k + 1, rec.states)


@register_solver("anderson")
def anderson(
    f: FlatFn,
    x0: Tensor,
    *,
    max_iter: int,
    tol: float,
    stop_mode: str,
    diverge_factor: float,
    compact: bool = False,
    record: Sequence[int] | None = None,
    m: int = 9,
    lam: float = 1e-4,
    beta: float = 1.0,
) -> FlatResult:
    """Anderson acceleration with a history of ``m`` and mixing ``beta``.

    Each step picks weights ``alpha`` (summing to 1) that minimise ``||sum_i alpha_i g_i||`` over
    the last ``m`` residuals ``g_i = f(x_i) - x_i``, with a ridge ``lam * mean_i ||g_i||^2``. The
    ridge is *relative* to the residuals: an absolute ridge (1e-4 in locuslab/deq and torchdeq)
    dominates the Gram matrix once residuals are small and stalls the solve near the tolerance.
    A singular or non-finite system falls back, for that sample only, to a damped Picard step.
    Only the new row of the Gram matrix is computed each step.

    The default history ``m=9`` needs as few evaluations as the best point of a grid over
    torchdeq's Anderson (m, lam, tau) on every problem of ``bench/solvers.py``; m=5 took up to 3
    more. It costs 2m state-sized buffers during the forward solve only.
    """
    b, d = x0.shape
    mon = _Monitor(x0, tol, stop_mode, diverge_factor, compact)
    rec = _Recorder(record, mon)
    xs = x0.new_empty(b, m, d)  # iterates x_i
    gs = x0.new_empty(b, m, d)  # residuals g_i
    gram = x0.new_zeros(b, m, m, dtype=torch.float64)
    eye = torch.eye(m, dtype=torch.float64, device=x0.device)
    ones = torch.ones(b, m, 1, dtype=torch.float64, device=x0.device)
    x = x0.clone()
    fallbacks = 0
    for k in range(max_iter):
        rec(k, x)
        fx = mon.evaluate(f, x)
        slot, n = k % m, min(k + 1, m)
        g = torch.sub(fx, x, out=gs[:, slot])
        if not mon.observe(k, x, fx, g):
            break
        if mon.keep is not None:
            x, xs, gs, gram, ones = mon.shrink(x, xs, gs, gram, ones)
            b, g = x.shape[0], gs[:, slot]
        xs[:, slot].copy_(x)
        row = _rowdot(gs[:, :n], g).squeeze(1).double()
        gram[:, slot, :n] = row
        gram[:, :n, slot] = row
        h = gram[:, :n, :n]
        scale = torch.diagonal(h, dim1=1, dim2=2).mean(1).clamp_min(1e-30)
        h = h + (lam * scale)[:, None, None] * eye[:n, :n]
        sol, info = torch.linalg.solve_ex(h, ones[:, :n])
        total = sol.sum(1)
        alpha = sol.squeeze(2) / total
        bad = (info != 0) | ~torch.isfinite(alpha).all(1) | (total.squeeze(1).abs() < 1e-30)
        if bool(bad.any()):
            fallbacks += int(bad.sum())
            plain = torch.zeros_like(alpha)
            plain[:, slot] = 1.0
            alpha = torch.where(bad[:, None], plain, alpha)
        alpha = alpha.to(x0.dtype)[:, None]  # (B, 1, n)
        # x_next = sum_i alpha_i (x_i + beta g_i), written into x without (B, n, D) temporaries
        torch.bmm(alpha, xs[:, :n], out=x[:, None])
        x.view(b, 1, d).baddbmm_(alpha, gs[:, :n], alpha=beta)
        x = mon.hold(x)
    return mon.result("anderson", max_iter, k + 1, rec.states, fallbacks)


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
            out.view(x.shape[0], 1, -1).baddbmm_(_rowdot(v, x), u)
        return out

    def rmatvec(self, x: Tensor) -> Tensor:
        """``x^T (-I + U^T V)``."""
        out = -x
        for u, v in self._parts():
            out.view(x.shape[0], 1, -1).baddbmm_(_rowdot(u, x), v)
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


@register_solver("broyden")
def broyden(
    f: FlatFn,
    x0: Tensor,
    *,
    max_iter: int,
    tol: float,
    stop_mode: str,
    diverge_factor: float,
    compact: bool = False,
    record: Sequence[int] | None = None,
    memory: int | None = None,
) -> FlatResult:
    """Broyden's ("good") method on g(x) = f(x) - x, with a low-rank inverse Jacobian.

    ``memory`` caps the number of rank-one updates kept (the estimate restarts when it is full);
    ``None`` keeps all of them, which still costs only the steps actually taken.
    """
    mon = _Monitor(x0, tol, stop_mode, diverge_factor, compact)
    rec = _Recorder(record, mon)
    inv = _LowRank(x0, memory)
    x = x0.clone()
    rec(0, x)
    gx = f(x) - x
    if not mon.observe(0, x, gx + x, gx):
        return mon.result("broyden", max_iter, 1, rec.states)
    if mon.keep is not None:
        x, gx = mon.shrink(x, gx)
    update = gx.clone()  # -H g with H = -I
    nfe = 1
    for k in range(1, max_iter):
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
    return mon.result("broyden", max_iter, nfe, rec.states)


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
    full["compact"] = full["compact"] != "off" and takes_index(f)
    with torch.no_grad(), torch.autocast(x0.device.type, enabled=False):
        return get_solver(name)(f, x0.detach(), record=record, **full)


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
