"""The parts every solver is built from: options, registries, the per-sample monitor, Anderson mixing.

Shared by the solvers of :mod:`.solvers` and by HyperAnderson (:mod:`.hyper`), so that a solver
is only its own update rule: the bookkeeping (residuals, best iterate, freezing, batch compaction)
and the Anderson least-squares step exist once.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar

import torch
from torch import Tensor

from .stats import SolverStats, Status

FlatFn = Callable[[Tensor], Tensor]
Check = Callable[[str, Any], None]
T = TypeVar("T")


class FlatResult(NamedTuple):
    z: Tensor
    stats: SolverStats
    states: list[Tensor]


# ----------------------------------------------------------------------------------------------
# Options and registries
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    """One option of a solver or backward mode, declared once: the config schema takes its type
    from here, the solver its default, and validation its check (``check(key, value)`` raises
    ``ValueError`` naming ``key``)."""

    default: Any
    type: Any
    check: Check | None = None

    def validate(self, key: str, value: Any) -> None:
        if self.check is not None:
            self.check(key, value)


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def integer(minimum: int) -> Check:
    def check(key: str, v: Any) -> None:
        if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
            raise ValueError(f"{key} must be an integer >= {minimum}, got {v!r}")

    return check


def positive(key: str, v: Any) -> None:
    if not _is_number(v) or not v > 0:
        raise ValueError(f"{key} must be a number > 0, got {v!r}")


def above(bound: float) -> Check:
    def check(key: str, v: Any) -> None:
        if not _is_number(v) or not v > bound:
            raise ValueError(f"{key} must be > {bound}, got {v!r}")

    return check


def in_range(lo: float, hi: float, lo_open: bool = False) -> Check:
    def check(key: str, v: Any) -> None:
        ok = _is_number(v) and (lo < v if lo_open else lo <= v) and v <= hi
        if not ok:
            raise ValueError(f"{key} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}")

    return check


def one_of(choices: Sequence[str]) -> Check:
    def check(key: str, v: Any) -> None:
        if v not in choices:
            raise ValueError(f"{key} must be one of {tuple(choices)}, got {v!r}")

    return check


def optional(inner: Check) -> Check:
    """``inner``, except that ``None`` (the option's "unset") passes."""

    def check(key: str, v: Any) -> None:
        if v is not None:
            inner(key, v)

    return check


class Registry(Generic[T]):
    """Entries chosen by name from a config (``solver=anderson``, ``backward=phantom``)."""

    def __init__(self, kind: str, plural: str) -> None:
        self.kind, self.plural = kind, plural
        self._entries: dict[str, T] = {}

    def add(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"a {self.kind} named '{name}' is already registered")
        self._entries[name] = entry
        return entry

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise ValueError(
                f"unknown {self.kind} '{name}'; known {self.plural}: {', '.join(self.names())}"
            ) from None


# ----------------------------------------------------------------------------------------------
# Per-sample bookkeeping
# ----------------------------------------------------------------------------------------------


class Monitor:
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
        if k == 0:
            self.first_abs = torch.where(finite, abs_res, torch.inf)
        return self._settle(x, res, abs_res, finite)

    def _settle(self, x: Tensor, res: Tensor, abs_res: Tensor, finite: Tensor) -> bool:
        """Stop converged, non-finite and diverged samples; decide whether rows leave."""
        converged = self.active & finite & (res < self.tol)
        nonfinite = self.active & ~finite
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


class Recorder:
    """Batch-sized copies of the iterate at chosen steps (for fixed-point correction)."""

    def __init__(self, steps: Sequence[int] | None, mon: Monitor | None = None) -> None:
        self.steps = set(steps or ())
        self.states: list[Tensor] = []
        self.mon = mon

    def __call__(self, k: int, x: Tensor) -> None:
        if k in self.steps:  # a copy: solvers update x in place
            self.states.append(x.clone() if self.mon is None else self.mon.expand(x))


class Run(NamedTuple):
    """What a registered solver gets beside f and x0: the monitor, the recorder, the budget."""

    mon: Monitor
    rec: Recorder
    max_iter: int

    def result(self, name: str, nfe: int, fallbacks: int = 0) -> FlatResult:
        return self.mon.result(name, self.max_iter, nfe, self.rec.states, fallbacks)


# ----------------------------------------------------------------------------------------------
# Anderson mixing
# ----------------------------------------------------------------------------------------------


def rowdot(rows: Tensor, x: Tensor) -> Tensor:
    """``rows @ x`` per sample, (B, n, D) x (B, D) -> (B, 1, n).

    Written as a row-vector product: on CPU, ``bmm(rows, x[..., None])`` takes a path several
    times slower for the same numbers.
    """
    return torch.bmm(x[:, None, :], rows.transpose(1, 2))


class AndersonMixer:
    """Anderson's mixing weights over a ring of ``m`` residuals.

    ``weights`` picks ``alpha`` (summing to 1) minimising ``||sum_i alpha_i g_i||`` with a ridge
    ``lam * mean_i ||g_i||^2`` *relative* to the residuals (an absolute ridge dominates the Gram
    matrix once residuals are small and stalls the solve near the tolerance). Only the newest row
    of the Gram matrix is computed per step. A singular or non-finite system falls back, for that
    sample only, to the plain step (weight 1 on the newest residual); ``fallbacks`` counts them.
    """

    def __init__(self, like: Tensor, m: int, lam: float) -> None:
        b = like.shape[0]
        self.lam, self.fallbacks = lam, 0
        self.gram = like.new_zeros(b, m, m, dtype=torch.float64)
        self.eye = torch.eye(m, dtype=torch.float64, device=like.device)
        self.ones = torch.ones(b, m, 1, dtype=torch.float64, device=like.device)

    def shrink(self, mon: Monitor) -> None:
        """Keep only the rows still being solved (batch compaction)."""
        self.gram, self.ones = mon.shrink(self.gram, self.ones)

    def weights(self, gs: Tensor, g: Tensor, slot: int) -> tuple[Tensor, Tensor]:
        """``(alpha (B, n) in g's dtype, fell_back (B,))`` for the ``n`` residuals ``gs`` whose
        newest, ``g``, sits in ring ``slot``."""
        n = gs.shape[1]
        row = rowdot(gs, g).squeeze(1).double()
        self.gram[:, slot, :n] = row
        self.gram[:, :n, slot] = row
        h = self.gram[:, :n, :n]
        scale = torch.diagonal(h, dim1=1, dim2=2).mean(1).clamp_min(1e-30)
        h = h + (self.lam * scale)[:, None, None] * self.eye[:n, :n]
        sol, info = torch.linalg.solve_ex(h, self.ones[:, :n])
        total = sol.sum(1)
        alpha = sol.squeeze(2) / total
        bad = (info != 0) | ~torch.isfinite(alpha).all(1) | (total.squeeze(1).abs() < 1e-30)
        if bool(bad.any()):
            self.fallbacks += int(bad.sum())
            plain = torch.zeros_like(alpha)
            plain[:, slot] = 1.0
            alpha = torch.where(bad[:, None], plain, alpha)
        return alpha.to(g.dtype), bad
