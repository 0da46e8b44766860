import math

import pytest
import torch
from torch import nn

from deq_lightning.deq import Status, get_solver, list_solvers, solve, solver_options

from .problems import PairCell, TanhCell, linear_problem

SOLVERS = ["fixed_point", "anderson", "broyden"]


def residual(f, z):
    fz = f(z)
    return (fz - z).flatten(1).norm(dim=1), fz


def test_registry_lists_known_names_on_unknown():
    assert set(SOLVERS) <= set(list_solvers())
    with pytest.raises(ValueError, match="known solvers: anderson, broyden, fixed_point"):
        get_solver("newton")


@pytest.mark.parametrize(
    "opts, match",
    [
        ({"max_iter": -1}, "max_iter must be an integer >= 1"),
        ({"max_iter": 2.5}, "max_iter must be an integer"),
        ({"tol": 0}, "tol must be a number > 0"),
        ({"stop_mode": "relative"}, "stop_mode must be one of"),
        ({"m": 0}, "m must be an integer >= 1"),
        ({"beta": 0.0}, "beta must be in"),
        ({"lam": -1.0}, "lam must be in"),
        ({"mixing": 0.5}, r"unknown option\(s\) \['mixing'\] for solver 'anderson'"),
    ],
)
def test_bad_options_name_the_key(opts, match):
    f, _, b = linear_problem()
    with pytest.raises(ValueError, match=match):
        solve(f, torch.zeros_like(b), solver="anderson", **opts)


@pytest.mark.parametrize("solver", SOLVERS)
def test_solver_options_listed(solver):
    opts = solver_options(solver)
    assert {"max_iter", "tol", "stop_mode"} <= set(opts)


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("kind", ["linear", "tanh", "conv", "pair"])
def test_converges_on_contractions(solver, kind):
    if kind == "linear":
        f, _, b = linear_problem(top=0.8)
        z0 = torch.zeros_like(b)
    elif kind == "tanh":
        cell, x = TanhCell(norm=0.9), torch.randn(5, 16, dtype=torch.float64)
        f, z0 = (lambda z: cell(z, x)), torch.zeros(5, 16, dtype=torch.float64)
    elif kind == "conv":
        conv = nn.Conv2d(4, 4, 3, padding=1).double()
        norm = nn.GroupNorm(2, 4).double()
        with torch.no_grad():
            conv.weight.mul_(0.3)
        x = 2 * torch.randn(3, 4, 8, 8, dtype=torch.float64)
        f, z0 = (lambda z: norm(torch.tanh(conv(z)) + x)), torch.zeros_like(x)
    else:
        cell, x = PairCell(), torch.randn(3, 12, dtype=torch.float64)
        f = lambda z: cell(z, x)  # noqa: E731
        z0 = (torch.zeros(3, 3, 4, dtype=torch.float64), torch.zeros(3, 6, dtype=torch.float64))
    z, stats = solve(f, z0, solver=solver, max_iter=300, tol=1e-8)
    assert stats.converged.all(), stats.stop_reason
    assert stats.stop_reason == "converged"
    assert stats.nstep.shape == (stats.status.shape[0],)
    assert (stats.nstep >= 1).all() and (stats.nstep <= stats.nfe).all()
    assert stats.abs_trace.shape[1] == stats.status.shape[0]
    # The reported residual is the residual of the returned state.
    fz = f(z)
    leaves = (
        (z, fz)
        if isinstance(z, torch.Tensor)
        else (torch.cat([t.flatten(1) for t in z], 1), torch.cat([t.flatten(1) for t in fz], 1))
    )
    abs_res = (leaves[1] - leaves[0]).flatten(1).norm(dim=1)
    torch.testing.assert_close(abs_res, stats.abs_res, rtol=1e-6, atol=1e-12)
    if not isinstance(z, torch.Tensor):
        assert type(z) is type(z0) and [t.shape for t in z] == [t.shape for t in z0]


@pytest.mark.parametrize("solver", SOLVERS)
def test_per_sample_steps_differ_with_difficulty(solver):
    # Sample 0 starts at the fixed point, sample 1 far away: different per-sample steps.
    f, a, b = linear_problem(top=0.7, batch=2)
    z_star = torch.linalg.solve(torch.eye(a.shape[0], dtype=a.dtype) - a, b.T).T
    z0 = torch.stack([z_star[0], z_star[1] + 10.0])
    _, stats = solve(f, z0, solver=solver, max_iter=200, tol=1e-8)
    assert stats.converged.all()
    assert stats.nstep[0] == 1 and stats.nstep[1] > 3


def test_quasi_newton_beats_plain_iteration_on_ill_conditioned_map():
    f, _, b = linear_problem(d=100, top=0.99)
    nfe = {}
    for s in SOLVERS:
        _, stats = solve(f, torch.zeros_like(b), solver=s, max_iter=2000, tol=1e-6)
        assert stats.converged.all(), (s, stats.stop_reason)
        nfe[s] = stats.nfe
    assert nfe["anderson"] < nfe["fixed_point"] / 3
    assert nfe["broyden"] < nfe["fixed_point"] / 3


@pytest.mark.parametrize("scale", [1e-4, 1.0, 1e4])
def test_anderson_default_ridge_is_scale_free(scale):
    f, a, b = linear_problem(top=0.95, dtype=torch.float32)
    g = lambda z: z @ a.T.float() + scale * b  # noqa: E731
    _, stats = solve(g, torch.zeros_like(b), solver="anderson", max_iter=200, tol=1e-5)
    _, ref = solve(f, torch.zeros_like(b), solver="anderson", max_iter=200, tol=1e-5)
    assert stats.converged.all()
    assert abs(stats.nfe - ref.nfe) <= 2


def test_stop_mode_abs_and_rel():
    f, _, b = linear_problem(top=0.8)
    big = lambda z: f(z) * 1.0 + 0 * z  # noqa: E731
    _, rel = solve(big, torch.zeros_like(b), solver="anderson", tol=1e-6, stop_mode="rel")
    _, abs_ = solve(big, torch.zeros_like(b), solver="anderson", tol=1e-6, stop_mode="abs")
    assert (rel.rel_res < 1e-6).all() and (abs_.abs_res < 1e-6).all()
    assert rel.stop_mode == "rel" and abs_.stop_mode == "abs"


def test_singular_anderson_system_does_not_raise():
    # A pure translation has no fixed point and identical residuals: with lam=0 the mixing system
    # is singular. The solver must fall back per sample, not raise.
    c = torch.ones(3, 8, dtype=torch.float64)
    _, stats = solve(lambda z: z + c, torch.zeros_like(c), solver="anderson", lam=0.0, max_iter=20)
    assert stats.fallbacks > 0
    assert (stats.status == Status.MAX_ITER).all()
    assert stats.stop_reason == "3/3 max_iter"


@pytest.mark.parametrize("solver", SOLVERS)
def test_one_nan_sample_does_not_stop_the_others(solver):
    f, _, b = linear_problem(top=0.8, batch=4)
    calls = {"n": 0}

    def poisoned(z):
        calls["n"] += 1
        out = f(z)
        if calls["n"] >= 3:  # sample 2 turns NaN from the third evaluation on
            out = out.clone()
            out[2] = math.nan
        return out

    z, stats = solve(poisoned, torch.zeros_like(b), solver=solver, max_iter=200, tol=1e-8)
    assert stats.status[2] == Status.NONFINITE
    assert stats.converged[[0, 1, 3]].all()
    assert torch.isfinite(z).all()
    assert stats.nstep[2] == 2  # the best iterate is the last finite one
    assert "1/4 nonfinite" in stats.stop_reason


@pytest.mark.parametrize("solver", SOLVERS)
def test_sample_without_fixed_point_is_flagged_and_returns_best(solver):
    f, _, b = linear_problem(top=0.8, batch=3)

    def g(z):
        out = f(z).clone()
        out[1] = z[1] + 1.0 + torch.exp(z[1])  # g(z) = 1 + exp(z) > 0: no fixed point at all
        return out

    # abs mode: rel = |g| / |f| -> 0 as z -> -inf would call the escape "converged"
    z, stats = solve(g, torch.zeros_like(b), solver=solver, max_iter=300, tol=1e-8, stop_mode="abs")
    assert stats.status[1] in (Status.DIVERGED, Status.MAX_ITER, Status.NONFINITE)
    assert stats.converged[[0, 2]].all()
    assert torch.isfinite(z).all()
    finite_trace = stats.abs_trace[:, 1].nan_to_num(math.inf)
    assert stats.abs_res[1] == finite_trace.min()


def test_diverging_fixed_point_is_flagged_diverged():
    b = torch.ones(2, 4, dtype=torch.float64)
    f = lambda z: 2.0 * z + b  # noqa: E731
    _, stats = solve(f, torch.zeros_like(b), solver="fixed_point", max_iter=100, stop_mode="abs")
    assert (stats.status == Status.DIVERGED).all()
    assert (stats.nstep == 1).all()  # the best (lowest-residual) iterate is the first one
    assert stats.nfe < 100  # stopped as soon as every sample had diverged


def test_broyden_memory_is_bounded_by_steps_not_max_iter():
    from deq_lightning.deq.solvers import _LowRank

    x = torch.zeros(2, 10)
    lr = _LowRank(x, memory=None)
    for _ in range(3):
        lr.append(torch.ones(2, 10), torch.ones(2, 10))
    assert lr.stored == _LowRank.CHUNK  # grows in chunks with the updates, not max_iter
    limited = _LowRank(x, memory=4)
    for i in range(10):
        limited.append(torch.full((2, 10), float(i)), torch.ones(2, 10))
    assert limited.stored == 4  # never more than `memory` updates stored
    assert limited.n == 2 and limited.us[0][0, :2, 0].tolist() == [8.0, 9.0]  # restarted at 8


def test_low_rank_products_match_dense():
    from deq_lightning.deq.solvers import _LowRank

    g = torch.Generator().manual_seed(0)
    lr = _LowRank(torch.zeros(3, 7, dtype=torch.float64), memory=None)
    us, vs = [], []
    for _ in range(11):  # two chunks, the second partly filled
        u, v = (
            torch.randn(3, 7, generator=g, dtype=torch.float64),
            torch.randn(3, 7, generator=g, dtype=torch.float64),
        )
        lr.append(u, v)
        us.append(u)
        vs.append(v)
    dense = -torch.eye(7, dtype=torch.float64) + torch.einsum(
        "nbi,nbj->bij", torch.stack(us), torch.stack(vs)
    )
    x = torch.randn(3, 7, generator=g, dtype=torch.float64)
    torch.testing.assert_close(lr.matvec(x), torch.einsum("bij,bj->bi", dense, x))
    torch.testing.assert_close(lr.rmatvec(x), torch.einsum("bi,bij->bj", x, dense))


def test_broyden_limited_memory_still_converges():
    f, _, b = linear_problem(top=0.95)
    _, stats = solve(f, torch.zeros_like(b), solver="broyden", memory=5, max_iter=500, tol=1e-8)
    assert stats.converged.all()


def test_fixed_point_damping():
    # f(z) = -0.95 z + b oscillates; damping 0.5 turns it into a fast contraction.
    b = torch.randn(2, 5, dtype=torch.float64)
    f = lambda z: -0.95 * z + b  # noqa: E731
    _, plain = solve(f, torch.zeros_like(b), solver="fixed_point", max_iter=2000, tol=1e-8)
    _, damped = solve(
        f, torch.zeros_like(b), solver="fixed_point", damping=0.5, max_iter=2000, tol=1e-8
    )
    assert damped.converged.all() and damped.nfe < plain.nfe / 5


@pytest.mark.parametrize("solver", SOLVERS)
def test_low_precision_autocast_solves_in_float32(solver):
    lin = nn.Linear(32, 32)
    with torch.no_grad():
        lin.weight.mul_(0.5 / torch.linalg.matrix_norm(lin.weight, 2))
    x = torch.randn(4, 32)
    z0 = torch.zeros(4, 32, dtype=torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, stats = solve(lambda z: torch.tanh(lin(z) + x), z0, solver=solver, tol=1e-2, max_iter=50)
    assert z.dtype == torch.bfloat16  # returned in the caller's dtype
    assert stats.abs_res.dtype == torch.float32  # but solved in float32
    assert stats.converged.all() and torch.isfinite(z.float()).all()


def test_no_graph_is_built():
    cell, x = TanhCell(), torch.randn(2, 16, dtype=torch.float64)
    z, _ = solve(lambda z: cell(z, x), torch.zeros(2, 16, dtype=torch.float64))
    assert not z.requires_grad


def test_bad_state_structure_is_explained():
    with pytest.raises(TypeError, match="tensor or a non-empty tuple/list"):
        solve(lambda z: z, [])
    with pytest.raises(ValueError, match="batch as dim 0"):
        solve(lambda z: z, (torch.zeros(2, 3), torch.zeros(3, 3)))
    with pytest.raises(ValueError, match="f changed the shape of state leaf 0"):
        solve(lambda z: z[:, :2], torch.zeros(2, 3))


@pytest.mark.parametrize("solver", ["fixed_point", "anderson"])
def test_steps_run_are_kept_apart_from_the_returned_iterate(solver):
    # f(z) = -z + 1 swaps two points forever: the first iterate is (one of) the best, so the
    # returned index stays small while every step of the budget is run.
    f = lambda z: 1.0 - z  # noqa: E731
    z0 = torch.full((3, 4), 0.2, dtype=torch.float64)
    _, stats = solve(f, z0, solver=solver, max_iter=15, tol=1e-8)
    if solver == "fixed_point":
        assert (stats.nstep == 1).all()
        assert (stats.steps == 15).all() and not stats.converged.any()
    else:  # Anderson solves this linear map in two steps: run and returned agree
        assert stats.converged.all() and torch.equal(stats.steps, stats.nstep)


@pytest.mark.parametrize("solver", SOLVERS)
def test_steps_stop_counting_when_a_sample_converges(solver):
    _, a, b = linear_problem(top=0.5)
    b[0] = 0.0  # sample 0 starts at its fixed point z* = 0
    f = lambda z: z @ a.T + b  # noqa: E731
    _, stats = solve(f, torch.zeros_like(b), solver=solver, max_iter=100, tol=1e-8)
    assert stats.converged.all()
    assert stats.steps[0] == 1 and (stats.steps[1:] > 1).all()
    assert (stats.steps >= stats.nstep).all()
    assert int(stats.steps.max()) == stats.nfe
