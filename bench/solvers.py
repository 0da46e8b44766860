"""Solver benchmark: our DEQ core next to torchdeq 0.1.0, measured side by side in one run.

    OMP_NUM_THREADS=1 python bench/solvers.py            # full run (~10 min on one CPU thread)
    OMP_NUM_THREADS=1 python bench/solvers.py --quick    # small sizes, a smoke test
    OMP_NUM_THREADS=1 python bench/solvers.py --problems conv attn --out reports/solvers.json
                                                          # + the JSON the README renders
    python bench/solvers.py --device cuda
    OMP_NUM_THREADS=1 python bench/solvers.py --compaction --out reports/compaction.json
                                                          # batch compaction on vs off only

Prints Markdown to stdout (progress goes to stderr). On seeded problems it reports, per solver,
the function evaluations (NFE) to reach the tolerance, the final residual, the solve time and
the solver's overhead (share of the time not spent in f), the peak memory; per backward mode the
backward passes through f, the backward time and the gradient error against a float64 reference;
and the peak memory of an implicit training step against backprop through unrolled steps.
torchdeq (``pip install -e '.[bench]'``) runs in the same process when it is importable.

Protocol (the same for both libraries):
* forward solves start from zeros, stop at a relative residual ``||f(z) - z|| / ||f(z)||`` of
  ``TOL`` (our default) within ``CAP`` evaluations, and are judged by a residual the benchmark
  recomputes itself; NFE is counted by a wrapper around f, not taken from the solver;
* "ours" is ``solve()`` / ``DEQ()`` with default options; torchdeq "default" is ``get_deq()``
  with its own defaults except the solver (and, for the NFE comparison, the same tol and
  stop mode); torchdeq "best" is the best point of ``TORCHDEQ_GRID`` for its Anderson;
* gradients are those of ``0.5 * ||z* - target||^2 / batch`` w.r.t. every parameter of f and
  the input, compared with a float64 reference: a float64 solve to a relative residual of
  1e-12, then the exact adjoint (a dense linear solve per sample for the tanh layers; an
  iterative solve whose residual, recomputed directly, is printed, for the others);
* peak memory is measured in one fresh spawned process per problem, each case after one
  unmeasured run of itself (see ``_common.peak_memory_mib``).
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib
import itertools
import json
import math
import os
import platform
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _common import Probe, git_commit, markdown_table, peak_memory_mib, rel_err, timed
from torch import Tensor, nn

from deq_lightning.deq import DEQ, solve, solver_options
from deq_lightning.deq.solvers import COMMON_DEFAULTS

SEED = 0
TOL, STOP_MODE, CAP = 1e-3, "rel", 100
PROBLEMS = ("tanh0.9", "tanh0.99", "conv", "attn")
# torchdeq's Anderson knobs around its defaults (m=6, lam=1e-4, tau=1.0); lam=1e-8 is a ridge
# too small to matter, 1e-6 gave the same NFE as 1e-8 on every problem here.
TORCHDEQ_GRID = {"m": (5, 6, 10), "lam": (1e-4, 1e-8), "tau": (1.0, 0.8)}
TD_ANDERSON_DEFAULT = (("m", 6), ("lam", 1e-4), ("tau", 1.0))
QUICK_GRID = {"m": (5, 6), "lam": (1e-4, 1e-8), "tau": (1.0,)}
TRAIN_ITERS = (10, 20, 40, 60)
TRAIN_PROBLEMS = ("conv", "attn")
REF_MAX_ITER, REF_TOL, REF_ADJOINT_TOL = 1000, 1e-12, 1e-10


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Problems
# ----------------------------------------------------------------------------------------------


class TanhCell(nn.Module):
    """``z -> tanh(W z + U x)`` with W symmetric and ``||W||_2 = norm``.

    The injection is small so that tanh works near its linear range, where the layer's
    contraction factor is close to ``norm`` (saturated units would make any norm look easy).
    """

    def __init__(self, d: int, norm: float) -> None:
        super().__init__()
        a = torch.randn(d, d)
        a = a + a.T
        self.weight = nn.Parameter(a * (norm / torch.linalg.matrix_norm(a, 2)))
        self.inject = nn.Parameter(0.1 * torch.randn(d, d) / math.sqrt(d))

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        return torch.tanh(z @ self.weight.T + x @ self.inject.T)


class ConvCell(nn.Module):
    """An MDEQ-style residual block on one stream (deq:MDEQ-Vision mdeq_core.py BasicBlock).

    ``z -> GN(relu(z + gain * GN(conv(relu(GN(conv(z))))) + x))``; ``gain`` sets how hard the
    fixed point is (0.7: plain iteration needs ~40 evaluations for a relative residual of 1e-3).
    """

    def __init__(self, c: int, groups: int = 4, gain: float = 0.7) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.norm1, self.norm2, self.norm3 = (nn.GroupNorm(groups, c) for _ in range(3))
        self.gain = gain

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        h = torch.relu(self.norm1(self.conv1(z)))
        return self.norm3(torch.relu(z + self.gain * self.norm2(self.conv2(h)) + x))


class AttnCell(nn.Module):
    """A post-LN attention + FFN block (the DEQ-Transformer's layer without memory).

    ``h = LN(z + gain * attn(z) + x); z -> LN(h + gain * ffn(h))``; ``gain`` sets how hard the
    fixed point is (2.5: plain iteration needs ~40 evaluations for a relative residual of 1e-3,
    like the conv cell).
    """

    def __init__(self, d: int, heads: int, gain: float = 2.5) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.gain = gain

    def forward(self, z: Tensor, x: Tensor) -> Tensor:
        h = self.norm1(z + self.gain * self.attn(z, z, z, need_weights=False)[0] + x)
        return self.norm2(h + self.gain * self.ffn(h))


@dataclass
class Problem:
    name: str
    shape: tuple[int, ...]
    cell: nn.Module
    x: Tensor
    target: Tensor

    def f(self, x: Tensor | None = None) -> Callable[[Tensor], Tensor]:
        x = self.x if x is None else x
        return lambda z: self.cell(z, x)

    def z0(self) -> Tensor:
        return torch.zeros_like(self.target)

    def loss(self, z: Tensor) -> Tensor:
        return 0.5 * (z - self.target).pow(2).sum() / z.shape[0]

    @property
    def label(self) -> str:
        return f"{self.name} {'x'.join(map(str, self.shape))}"


def build_problem(name: str, quick: bool, device: torch.device) -> Problem:
    """The same seeded problem in every process (built on CPU, then moved)."""
    torch.manual_seed(SEED + PROBLEMS.index(name))
    if name.startswith("tanh"):
        b, d = (4, 32) if quick else (32, 512)
        cell, shape = TanhCell(d, float(name[4:])), (b, d)
    elif name == "conv":
        b, c, hw = (2, 16, 8) if quick else (16, 32, 32)
        cell, shape = ConvCell(c), (b, c, hw, hw)
    else:
        b, length, d, heads = (2, 8, 16, 2) if quick else (8, 32, 64, 4)
        cell, shape = AttnCell(d, heads), (b, length, d)
    x, target = torch.randn(shape), torch.randn(shape)
    return Problem(name, shape, cell.to(device), x.to(device), target.to(device))


def max_rel_residual(f: Callable[[Tensor], Tensor], z: Tensor) -> float:
    with torch.no_grad():
        fz = f(z)
        return ((fz - z).flatten(1).norm(dim=1) / fz.flatten(1).norm(dim=1)).max().item()


# ----------------------------------------------------------------------------------------------
# Forward solves
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Solve:
    lib: str  # "ours" or "torchdeq"
    solver: str
    opts: tuple[tuple[str, object], ...] = ()
    tag: str = "default"

    @property
    def label(self) -> str:
        shown = dict(self.opts)
        if self.lib == "ours":
            defaults = solver_options(self.solver).items()
            shown = {**{k: v for k, v in defaults if k not in COMMON_DEFAULTS}, **shown}
        inner = ", ".join(f"{k}={v}" for k, v in shown.items())
        return f"{self.lib} {self.solver} {self.tag}" + (f" ({inner})" if inner else "")


def solve_fn(case: Solve, f: Callable[[Tensor], Tensor], z0: Tensor) -> Callable[[], Tensor]:
    """A no-argument solve (set-up such as building torchdeq's DEQ object happens here)."""
    if case.lib == "ours":
        opts = dict(case.opts)
        return lambda: solve(
            f, z0, solver=case.solver, max_iter=CAP, tol=TOL, stop_mode=STOP_MODE, **opts
        )[0]
    torchdeq = importlib.import_module("torchdeq")
    deq = torchdeq.get_deq(
        f_solver=case.solver, f_max_iter=CAP, f_tol=TOL, f_stop_mode=STOP_MODE
    ).eval()
    kwargs = dict(case.opts)
    return lambda: deq(f, z0, solver_kwargs=kwargs)[0][-1]


@dataclass
class ForwardResult:
    case: Solve
    nfe: int
    residual: float
    seconds: float
    overhead: float
    peak_mib: float | None = None

    @property
    def converged(self) -> bool:
        return self.residual < TOL


def measure_forward(
    problem: Problem, case: Solve, device: torch.device, repeats: int
) -> ForwardResult:
    probe = Probe(problem.f(), device)
    run = solve_fn(case, probe, problem.z0())
    with torch.no_grad():
        times, z = timed(run, device, repeats)
    nfe = probe.calls // len(times)  # every run takes the same steps from the same z0
    median = sorted(times)[len(times) // 2]
    residual = max_rel_residual(problem.f(), z)
    return ForwardResult(case, nfe, residual, median, 1.0 - probe.seconds / sum(times))


def tune_torchdeq_anderson(
    problem: Problem, grid: dict, device: torch.device
) -> tuple[Solve, dict[tuple, tuple[int, bool]]]:
    """NFE of every grid point; the best is the converged one with the fewest NFE."""
    seen: dict[tuple, tuple[int, bool]] = {}
    for values in itertools.product(*grid.values()):
        opts = tuple(zip(grid, values))
        probe = Probe(problem.f(), device)
        with torch.no_grad():
            z = solve_fn(Solve("torchdeq", "anderson", opts), probe, problem.z0())()
            seen[opts] = (probe.calls, max_rel_residual(problem.f(), z) < TOL)
    ok = [o for o, (_, conv) in seen.items() if conv] or list(seen)
    best = min(ok, key=lambda o: seen[o][0])
    return Solve("torchdeq", "anderson", best, "best of grid"), seen


# ----------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------


@dataclass
class Reference:
    z_star: Tensor
    grads: list[Tensor]
    forward_residual: float
    adjoint_residual: float
    method: str


def reference(problem: Problem) -> Reference:
    """Float64 equilibrium and exact implicit gradient, with both residuals checked directly."""
    cell = copy.deepcopy(problem.cell).double()
    x = problem.x.detach().double().requires_grad_()
    target = problem.target.double()
    f = lambda z: cell(z, x)  # noqa: E731
    with torch.no_grad():
        z_star, _ = solve(
            f,
            torch.zeros_like(target),
            solver="anderson",
            max_iter=REF_MAX_ITER,
            tol=REF_TOL,
            m=5,
        )
    z_in = z_star.detach().requires_grad_()
    fz = f(z_in)
    g = (z_star - target) / z_star.shape[0]  # dL/dz of 0.5 * ||z - target||^2 / batch

    def vjp(y: Tensor) -> Tensor:
        return torch.autograd.grad(fz, z_in, y, retain_graph=True)[0]

    if isinstance(cell, TanhCell):
        method = "dense solve of (I - J^T) y = dL/dz per sample"
        jac = torch.autograd.functional.jacobian(
            lambda z: f(z).sum(0), z_star, vectorize=True
        )  # jac[i, b, j] = d f(z)[b, i] / d z[b, j]: samples do not interact
        jt = jac.permute(1, 2, 0)
        eye = torch.eye(jt.shape[1], dtype=jt.dtype, device=jt.device)
        y = torch.linalg.solve(eye - jt, g)
    else:
        method = f"Anderson (m=5) on y = J^T y + dL/dz to {REF_ADJOINT_TOL:g}"
        y, _ = solve(
            lambda y: vjp(y) + g,
            g,
            solver="anderson",
            max_iter=REF_MAX_ITER,
            tol=REF_ADJOINT_TOL,
            m=5,
        )
    adjoint_res = ((y - vjp(y) - g).norm() / g.norm()).item()
    grads = torch.autograd.grad(fz, [*cell.parameters(), x], y)
    return Reference(z_star.float(), list(grads), max_rel_residual(f, z_star), adjoint_res, method)


@dataclass(frozen=True)
class Grad:
    label: str
    lib: str
    kwargs: tuple[tuple[str, object], ...] = ()


OUR_GRADS = (
    Grad("ours implicit (default)", "ours"),
    Grad("ours phantom (default)", "ours", (("backward", "phantom"),)),
    Grad("ours one_step", "ours", (("backward", "one_step"),)),
)
TD_GRADS = (
    Grad("torchdeq ift (default b_*)", "torchdeq", (("f_solver", "anderson"), ("ift", True))),
    Grad("torchdeq get_deq() default grad", "torchdeq", (("f_solver", "anderson"),)),
)
TD_B_TOL = 1e-6  # torchdeq's default b_tol (b_stop_mode 'abs')


@dataclass
class GradResult:
    case: Grad
    passes: int
    seconds: float
    stopped: str
    err_at_ref: float
    worst_at_ref: float
    err_default_fwd: float = math.nan
    stop_ok: bool | None = None


def run_grad(
    problem: Problem, case: Grad, z0: Tensor, device: torch.device
) -> tuple[list[Tensor], int, float, str, bool | None]:
    """One training step; returns grads, backward passes through f, backward seconds, stop."""
    x = problem.x.detach().clone().requires_grad_()
    params = list(problem.cell.parameters())
    for p in params:
        p.grad = None
    probe = Probe(problem.f(x), device)
    box: dict = {}
    if case.lib == "ours":
        z, stats = DEQ(**dict(case.kwargs))(probe, z0)
    else:
        torchdeq = importlib.import_module("torchdeq")
        deq = torchdeq.get_deq(**dict(case.kwargs)).train()
        zs, _ = deq(probe, z0, backward_writer=lambda info: box.update(info=info))
        z = zs[-1]
    loss = problem.loss(z)
    probe.reset()
    (seconds,), _ = timed(loss.backward, device, 1)
    grads = [p.grad for p in params] + [x.grad]
    if case.lib == "ours":
        bwd = stats.backward
        if bwd is None:
            return grads, probe.backward_passes, seconds, "n/a (no solver)", None
        res, ok = bwd.residual.max().item(), bool(bwd.converged.all())
        stop = f"{'tol' if ok else 'max_iter'} ({bwd.stop_mode} {res:.1e})"
    elif "info" in box:
        res = box["info"]["abs_lowest"].max().item()
        ok = res < TD_B_TOL
        stop = f"{'tol' if ok else 'max_iter'} (abs {res:.1e})"
    else:
        return grads, probe.backward_passes, seconds, "n/a (no solver)", None
    return grads, probe.backward_passes, seconds, stop, ok


def measure_grad(
    problem: Problem, case: Grad, ref: Reference, device: torch.device, repeats: int
) -> GradResult:
    """Backward time: median over up to ``repeats`` steps (fewer once 3 s of backward is spent)."""
    runs = []
    while len(runs) < repeats and sum(r[2] for r in runs) < 3.0:
        runs.append(run_grad(problem, case, ref.z_star.clone(), device))
    grads, passes, _, stop, ok = runs[-1]
    seconds = sorted(r[2] for r in runs)[len(runs) // 2]
    err, worst = rel_err(grads, ref.grads)
    e2e = run_grad(problem, case, problem.z0(), device)[0]
    return GradResult(case, passes, seconds, stop, err, worst, rel_err(e2e, ref.grads)[0], ok)


# ----------------------------------------------------------------------------------------------
# Memory cases (run in a fresh process; module-level so that they pickle)
# ----------------------------------------------------------------------------------------------


def prepare_forward(name: str, quick: bool, device: str, case: Solve) -> Callable[[], object]:
    problem = build_problem(name, quick, torch.device(device))
    run = solve_fn(case, problem.f(), problem.z0())

    def go() -> None:
        with torch.no_grad():
            run()

    return go


def prepare_train(name: str, quick: bool, device: str, backward: str, n: int) -> Callable:
    problem = build_problem(name, quick, torch.device(device))
    x = problem.x.clone().requires_grad_()
    f = problem.f(x)
    if backward == "implicit":  # tol below reach: exactly n forward iterations
        deq = DEQ(solver_opts={"max_iter": n, "tol": 1e-12})
    else:
        deq = DEQ(backward="unrolled", backward_opts={"steps": n})
    params = [*problem.cell.parameters(), x]

    def go() -> None:
        z, _ = deq(f, problem.z0())
        problem.loss(z).backward()
        for p in params:  # each measured step allocates its gradients afresh
            p.grad = None

    return go


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


@dataclass
class ProblemResults:
    problem: Problem
    forward: list[ForwardResult] = field(default_factory=list)
    grid: dict = field(default_factory=dict)
    ref: Reference | None = None
    grads: list[GradResult] = field(default_factory=list)
    train: dict[tuple[str, int], float | None] = field(default_factory=dict)

    def fwd(self, lib: str, solver: str, tag: str = "default") -> ForwardResult | None:
        for r in self.forward:
            if (r.case.lib, r.case.solver, r.case.tag) == (lib, solver, tag):
                return r
        return None


def forward_table(results: list[ProblemResults]) -> str:
    rows = []
    for pr in results:
        for r in pr.forward:
            rows.append(
                [
                    pr.problem.label,
                    r.case.label,
                    r.nfe,
                    r.converged,
                    f"{r.residual:.1e}",
                    f"{1e3 * r.seconds:.1f}",
                    f"{100 * r.overhead:.0f}%",
                    None if r.peak_mib is None else f"{r.peak_mib:.1f}",
                ]
            )
    head = ["problem", "solver", "NFE", "conv.", "rel res", "time ms", "overhead", "peak MiB"]
    return markdown_table(head, rows)


def grid_table(results: list[ProblemResults]) -> str:
    keys = list(results[0].grid)
    rows = []
    for opts in keys:
        row = ["/".join(f"{v:g}" for _, v in opts)]
        for pr in results:
            nfe, ok = pr.grid[opts]
            row.append(f"{nfe}" + ("" if ok else " (not conv.)"))
        rows.append(row)
    return markdown_table(["m/lam/tau", *(pr.problem.name for pr in results)], rows)


def grad_table(results: list[ProblemResults]) -> str:
    rows = []
    for pr in results:
        for r in pr.grads:
            rows.append(
                [
                    pr.problem.name,
                    r.case.label,
                    r.passes,
                    r.stopped,
                    f"{1e3 * r.seconds:.1f}",
                    f"{r.err_at_ref:.1e}",
                    f"{r.worst_at_ref:.1e}",
                    f"{r.err_default_fwd:.1e}",
                ]
            )
    head = [
        "problem",
        "backward",
        "bwd passes",
        "stopped at",
        "bwd ms",
        "grad err",
        "worst tensor",
        "grad err (default fwd)",
    ]
    return markdown_table(head, rows)


def train_table(results: list[ProblemResults]) -> str:
    rows = []
    for pr in results:
        if not pr.train:
            continue
        for n in TRAIN_ITERS:
            imp, unr = pr.train.get(("implicit", n)), pr.train.get(("unrolled", n))
            ratio = None if imp is None or not unr else f"{imp / unr:.2f}"
            rows.append([pr.problem.name, n, _mib(imp), _mib(unr), ratio])
    head = ["problem", "iterations", "implicit MiB", "unrolled MiB", "implicit / unrolled"]
    return markdown_table(head, rows)


def _mib(v: float | None) -> str | None:
    return None if v is None else f"{v:.1f}"


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b == 0 else a / b


def targets(results: list[ProblemResults], have_td: bool) -> list[list[str]]:
    """Each target of the issue: [target, its measured numbers, whether it is met]."""
    rows: list[list[str]] = []

    def add(what: str, per: dict[str, tuple[str, bool | None]]) -> None:
        known = [ok for _, ok in per.values() if ok is not None]
        verdict = "n/a" if not known else ("met" if all(known) else "NOT met")
        rows.append([what, "; ".join(f"{k}: {v}" for k, (v, _) in per.items()), verdict])

    if have_td:
        per = {}
        for pr in results:
            ours, best = pr.fwd("ours", "anderson"), pr.fwd("torchdeq", "anderson", "best of grid")
            per[pr.problem.name] = (
                f"{ours.nfe} vs {best.nfe}",
                ours.converged and ours.nfe <= best.nfe,
            )
        add("NFE: ours anderson <= torchdeq best-of-grid anderson", per)
        per = {}
        for pr in results:
            r = _ratio(pr.fwd("ours", "anderson").seconds, pr.fwd("torchdeq", "anderson").seconds)
            per[pr.problem.name] = (f"{r:.2f}x", r <= 0.5)
        add("solve time: ours anderson <= 0.5x torchdeq default anderson", per)
        per, mem = {}, {}
        for pr in results:
            ours, td = pr.fwd("ours", "broyden"), pr.fwd("torchdeq", "broyden")
            r = _ratio(ours.seconds, td.seconds)
            per[pr.problem.name] = (f"{r:.2f}x", r <= 0.1)
            m = _ratio(ours.peak_mib, td.peak_mib)
            mem[pr.problem.name] = ("n/a", None) if m is None else (f"{m:.2f}x", m <= 0.25)
        add("broyden time: ours <= 0.1x torchdeq", per)
        add("broyden peak memory: ours <= 0.25x torchdeq", mem)
    for pr in results:
        if pr.problem.name == "conv":
            o = pr.fwd("ours", "anderson").overhead
            add("solver overhead (ours anderson) <= 15% on conv", {"conv": (f"{o:.0%}", o <= 0.15)})
    per, stops = {}, {}
    for pr in results:
        g = pr.grads[0]
        per[pr.problem.name] = (f"{g.err_at_ref:.1e}", g.err_at_ref <= 1e-3)
        stops[pr.problem.name] = (g.stopped, g.stop_ok)
    add("implicit backward (default): grad rel err <= 1e-3", per)
    add("implicit backward (default): stops at tolerance", stops)
    flat, below = {}, {}
    for pr in results:
        if not pr.train:
            continue
        i10, i60 = pr.train.get(("implicit", 10)), pr.train.get(("implicit", 60))
        u40 = pr.train.get(("unrolled", 40))
        r = _ratio(i60, i10)
        flat[pr.problem.name] = ("n/a", None) if r is None else (f"{r:.2f}x", r <= 1.1)
        r = _ratio(i60, u40)
        below[pr.problem.name] = ("n/a", None) if r is None else (f"{1 - r:.0%} below", r <= 0.15)
    if flat:
        add("training step: implicit@60 <= 1.1x implicit@10", flat)
        add("training step: implicit@60 >= 85% below unrolled@40", below)
    return rows


def report_json(results: list[ProblemResults], quick: bool, td_version: str | None) -> dict:
    """The forward solves and the targets' verdicts, for ``bench/readme.py``."""
    forward = [
        {
            "problem": pr.problem.label,
            "solver": r.case.label,
            "nfe": r.nfe,
            "converged": r.converged,
            "residual": r.residual,
            "seconds": r.seconds,
            "overhead": r.overhead,
            "peak_mib": r.peak_mib,
        }
        for pr in results
        for r in pr.forward
    ]
    return {
        "command": "python bench/solvers.py " + " ".join(sys.argv[1:]),
        "commit": git_commit(),
        "torch": torch.__version__,
        "torchdeq": td_version,
        "threads": torch.get_num_threads(),
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "quick": quick,
        "forward": forward,
        "targets": [
            dict(zip(("target", "measured", "verdict"), r))
            for r in targets(results, td_version is not None)
        ],
    }


# ----------------------------------------------------------------------------------------------
# Batch compaction: a batch of mixed difficulty, compact on vs off
# ----------------------------------------------------------------------------------------------

# Per-sample gains of the conv cell: the hard half keeps the problem's gain (0.7), the easy half
# gets one at which every solver needs about a third of the hard half's evaluations.
HARD_GAIN, EASY_GAIN = 0.7, 0.05
COMPACT_SOLVERS = ("anderson", "broyden", "fixed_point")


class MixedConvCell(ConvCell):
    """The conv cell with one gain per sample (``gain`` of shape (B,))."""

    def forward(self, z: Tensor, x: Tensor, gain: Tensor) -> Tensor:
        h = torch.relu(self.norm1(self.conv1(z)))
        g = gain[:, None, None, None]
        return self.norm3(torch.relu(z + g * self.norm2(self.conv2(h)) + x))


def mixed_problem(quick: bool, device: torch.device) -> tuple[Callable, Tensor]:
    """The seeded conv problem of :func:`build_problem` with an easy half and a hard half.

    Returns an f that opts in to compaction (it index-selects the injection and the gains) and
    the starting state.
    """
    torch.manual_seed(SEED + PROBLEMS.index("conv"))
    b, c, hw = (4, 16, 8) if quick else (16, 32, 32)
    cell = MixedConvCell(c).to(device)
    x = torch.randn(b, c, hw, hw, device=device)
    gain = torch.tensor([EASY_GAIN, HARD_GAIN] * (b // 2), device=device)

    def f(z: Tensor, index: Tensor | None = None) -> Tensor:
        if index is None:
            return cell(z, x, gain)
        return cell(z, x[index], gain[index])

    return f, torch.zeros_like(x)


def bench_compaction(args: argparse.Namespace, device: torch.device) -> dict:
    """Wall-clock of each solver with ``compact`` on and off, interleaved in one process.

    Both settings return the same iterates (the equality is asserted here, as in the tests), so
    the final residuals are equal and the ratio is the time saved by compaction alone.
    """
    f, z0 = mixed_problem(args.quick, device)
    repeats = 1 if args.quick else 5
    rows = []
    for solver in COMPACT_SOLVERS:
        seen: dict[str, list[int]] = {}

        def run(mode: str, solver: str = solver, seen: dict = seen) -> tuple[Tensor, object]:
            rows_seen: list[int] = []

            def counted(z: Tensor, index: Tensor | None = None) -> Tensor:
                rows_seen.append(z.shape[0])
                return f(z, index)

            out = solve(counted, z0, solver=solver, max_iter=CAP, tol=TOL, stop_mode=STOP_MODE,
                        compact=mode)  # fmt: skip
            seen[mode] = rows_seen
            return out

        with torch.no_grad():
            run("on"), run("off")  # warm-up
            times: dict[str, list[float]] = {"on": [], "off": []}
            for _ in range(repeats):  # interleaved: a load spike hits both settings alike
                for mode in ("on", "off"):
                    t, out = timed(lambda m=mode: run(m), device, 1)
                    times[mode] += t
                    if mode == "on":
                        (z_on, st_on) = out
                    else:
                        (z_off, st_off) = out
        # float32 convolutions over 16 or 8 rows round differently: equal to ~1e-6 relative
        same = torch.allclose(z_on, z_off, rtol=1e-4, atol=1e-4)
        if not same or not torch.equal(st_on.nstep, st_off.nstep):
            raise AssertionError(f"{solver}: compaction changed the solution")
        easy, hard = st_on.nstep[0::2].float(), st_on.nstep[1::2].float()
        med = {m: sorted(t)[len(t) // 2] for m, t in times.items()}
        f_rows = {m: sum(seen[m]) for m in seen}
        rows.append(
            {
                "solver": solver,
                "batch": int(z0.shape[0]),
                "easy_nstep_mean": easy.mean().item(),
                "hard_nstep_mean": hard.mean().item(),
                "easy_over_hard_steps": (easy.mean() / hard.mean()).item(),
                "converged_fraction": st_on.converged.float().mean().item(),
                "final_rel_res_max_on": max_rel_residual(lambda z: f(z), z_on),
                "final_rel_res_max_off": max_rel_residual(lambda z: f(z), z_off),
                "nfe": st_on.nfe,
                "f_rows_on": f_rows["on"],
                "f_rows_off": f_rows["off"],
                "ideal_speedup_f_rows": f_rows["off"] / f_rows["on"],
                "seconds_on": med["on"],
                "seconds_off": med["off"],
                "times_on": times["on"],
                "times_off": times["off"],
                "speedup_off_over_on": med["off"] / med["on"],
            }
        )
        log(f"[compaction] {solver}: {med['off'] / med['on']:.2f}x")
    return {
        "command": "python bench/solvers.py " + " ".join(sys.argv[1:]),
        "commit": git_commit(),
        "problem": f"conv cell {'x'.join(map(str, z0.shape))}, gains {EASY_GAIN}/{HARD_GAIN} "
        "alternating (easy/hard halves)",
        "tol": TOL,
        "stop_mode": STOP_MODE,
        "max_iter": CAP,
        "repeats": repeats,
        "target_speedup": 1.5,
        "torch": torch.__version__,
        "device": str(device),
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "load_average_1_5_15": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "shared_machine": True,
        "quick": args.quick,
        "rows": rows,
    }


def compaction_markdown(report: dict) -> str:
    rows = [
        [
            r["solver"],
            f"{r['easy_nstep_mean']:.1f} / {r['hard_nstep_mean']:.1f}",
            f"{r['final_rel_res_max_on']:.1e} / {r['final_rel_res_max_off']:.1e}",
            f"{r['ideal_speedup_f_rows']:.2f}x",
            f"{1e3 * r['seconds_off']:.0f}",
            f"{1e3 * r['seconds_on']:.0f}",
            f"{r['speedup_off_over_on']:.2f}x",
        ]
        for r in report["rows"]
    ]
    head = ["solver", "steps easy / hard", "max rel res on / off", "f rows off/on",
            "off ms", "on ms", "speed-up"]  # fmt: skip
    return markdown_table(head, rows)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def bench_problem(
    name: str, args: argparse.Namespace, device: torch.device, have_td: bool
) -> ProblemResults:
    problem = build_problem(name, args.quick, device)
    pr = ProblemResults(problem)
    repeats = 1 if args.quick else 3
    with torch.no_grad():
        problem.f()(problem.z0())  # warm-up
    cases = [Solve("ours", s) for s in ("anderson", "broyden", "fixed_point")]
    if have_td:
        log(f"[{name}] tuning torchdeq anderson over its grid")
        best, pr.grid = tune_torchdeq_anderson(
            problem, QUICK_GRID if args.quick else TORCHDEQ_GRID, device
        )
        cases += [
            Solve("torchdeq", "anderson", TD_ANDERSON_DEFAULT),
            best,
            Solve("torchdeq", "broyden"),
            Solve("torchdeq", "fixed_point_iter"),
        ]
    for case in cases:
        log(f"[{name}] forward: {case.label}")
        pr.forward.append(measure_forward(problem, case, device, repeats))
    log(f"[{name}] float64 reference")
    pr.ref = reference(problem)
    for case in OUR_GRADS + (TD_GRADS if have_td else ()):
        log(f"[{name}] backward: {case.label}")
        pr.grads.append(measure_grad(problem, case, pr.ref, device, repeats))
    log(f"[{name}] peak memory (fresh process)")
    dev = str(device)
    prepares = [functools.partial(prepare_forward, name, args.quick, dev, c) for c in cases]
    train_keys = []
    if name in TRAIN_PROBLEMS:
        train_keys = [(b, n) for b in ("implicit", "unrolled") for n in TRAIN_ITERS]
        prepares += [
            functools.partial(prepare_train, name, args.quick, dev, b, n) for b, n in train_keys
        ]
    peaks = peak_memory_mib(prepares, device, args.threads)
    for r, peak in zip(pr.forward, peaks):
        r.peak_mib = peak
    pr.train = dict(zip(train_keys, peaks[len(cases) :]))
    return pr


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, one repeat (smoke)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    parser.add_argument("--problems", nargs="+", choices=PROBLEMS, default=list(PROBLEMS))
    parser.add_argument(
        "--compaction", action="store_true", help="only batch compaction on vs off (JSON)"
    )
    parser.add_argument("--out", default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.compaction:
        report = bench_compaction(args, device)
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"## Batch compaction (`{report['command'].strip()}`)\n")
        print(f"{report['problem']}; load average {report['load_average_1_5_15']}.\n")
        print(compaction_markdown(report))
        return
    try:
        torchdeq = importlib.import_module("torchdeq")
        td_version = getattr(torchdeq, "__version__", "installed")
    except ImportError:
        td_version = None
    results = [bench_problem(n, args, device, td_version is not None) for n in args.problems]
    print_report(results, args, device, td_version)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        report = report_json(results, args.quick, td_version)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


def print_report(
    results: list[ProblemResults],
    args: argparse.Namespace,
    device: torch.device,
    td_version: str | None,
) -> None:
    cmd = "python bench/solvers.py " + " ".join(sys.argv[1:])
    print(f"## Solver benchmark (`{cmd.strip()}`)\n")
    load = f", load average {os.getloadavg()[1]:.1f}" if hasattr(os, "getloadavg") else ""
    print(
        f"torch {torch.__version__}, torchdeq {td_version or 'not installed'}, "
        f"{device} ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs{load}), "
        f"{args.threads} thread(s), seed {SEED}{', quick sizes' if args.quick else ''}.\n"
    )
    if td_version is None:
        print(
            "torchdeq is not importable: its rows and the ratio targets are skipped "
            "(`pip install -e '.[bench]'`).\n"
        )
    print(f"### Forward solves (stop at {STOP_MODE} residual {TOL:g}, at most {CAP} evaluations)\n")
    print(forward_table(results))
    print(
        "\nNFE: evaluations of f counted around f. rel res: max over the batch of "
        "||f(z)-z||/||f(z)|| recomputed at the returned z. time: median of up to 3 runs. "
        "overhead: share of the solve time spent outside f. peak MiB: peak memory of one solve "
        "above the memory after set-up, in a fresh process.\n"
    )
    if results[0].grid:
        print(
            "torchdeq anderson grid (NFE per problem; the best converged point is its "
            "'best of grid' row):\n"
        )
        print(grid_table(results))
        print()
    print("### Backward (gradient of 0.5*||z*-target||^2/batch w.r.t. parameters and input)\n")
    print(grad_table(results))
    print(
        "\nbwd passes: backward passes through f (adjoint VJPs plus the final pass to the "
        "parameters), counted at f's output. grad err: ||g - g_ref|| / ||g_ref|| over all "
        "parameters and the input, with the forward started at the float64 equilibrium (so it "
        "measures the backward alone); worst tensor: the largest per-tensor relative error; "
        "grad err (default fwd): the same from z0 = 0 with each side's default forward solve.\n"
    )
    print("Float64 references:\n")
    print(
        markdown_table(
            ["problem", "adjoint", "forward rel res", "adjoint rel res"],
            [
                [
                    pr.problem.name,
                    pr.ref.method,
                    f"{pr.ref.forward_residual:.1e}",
                    f"{pr.ref.adjoint_residual:.1e}",
                ]
                for pr in results
            ],
        )
    )
    if any(pr.train for pr in results):
        print("\n### Training step peak memory: implicit (n forward iterations) vs unrolled\n")
        print(train_table(results))
        print(
            "\nOne forward + backward of our DEQ, peak above the memory after set-up, in a "
            "fresh process. implicit: n Anderson iterations (tol out of reach), default "
            "implicit backward; unrolled: backprop through n applications of f.\n"
        )
    print("### Targets\n")
    if args.quick:
        print("Quick sizes: a smoke test; these verdicts say nothing about the targets.\n")
    print(
        markdown_table(["target", "measured", "verdict"], targets(results, td_version is not None))
    )


if __name__ == "__main__":
    main()
