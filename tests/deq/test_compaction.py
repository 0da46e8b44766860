"""Batch compaction: stopped samples leave the active batch, and nothing else changes.

Every check compares against a solve that cannot be affected by compaction: the same sample
solved alone (a batch of one) or the same batch with ``compact="off"``.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from deq_lightning.deq import DEQ, HyperAndersonNet, VariationalDropout, save_hypersolver, solve
from deq_lightning.deq.solvers import takes_index

from .problems import PairCell, spectral_scaled

SOLVERS = ["fixed_point", "anderson", "broyden", "hyperanderson"]
D = 24
TOL, MAX_ITER = 1e-9, 300


class MixedCell(nn.Module):
    """``z -> tanh(s_b W z + U x_b)``: each sample has its own contraction factor ``s_b``,
    so samples of one batch need very different numbers of steps."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(3)
        self.w = nn.Parameter(
            spectral_scaled(torch.randn(D, D, generator=g, dtype=torch.float64), 1)
        )
        self.u = nn.Parameter(torch.randn(D, D, generator=g, dtype=torch.float64) / D**0.5)

    def forward(self, z: Tensor, x: Tensor, s: Tensor) -> Tensor:
        return torch.tanh(s[:, None] * (z @ self.w.T) + x @ self.u.T)


class Counted:
    """An index-aware f over a batch's injection, recording how many rows each call saw."""

    def __init__(self, cell: MixedCell, x: Tensor, s: Tensor) -> None:
        self.cell, self.x, self.s = cell, x, s
        self.rows: list[int] = []

    def __call__(self, z: Tensor, index: Tensor | None = None) -> Tensor:
        self.rows.append(z.shape[0])
        x, s = (self.x, self.s) if index is None else (self.x[index], self.s[index])
        return self.cell(z, x, s)


def batch(n: int = 6, seed: int = 0) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=torch.float64)
    s = torch.tensor([0.2, 0.97] * (n // 2), dtype=torch.float64)  # easy, hard, easy, ...
    return x, s


def solver_kwargs(solver: str, tmp_path) -> dict:
    if solver != "hyperanderson":
        return {"solver": solver}
    net = HyperAndersonNet(dim=D, m=9).double()  # zeroed output layers: steers like Anderson
    with torch.no_grad():
        net.init_scale.fill_(0.05)  # a non-trivial initializer, so the net's path runs
    return {"solver": solver, "path": str(save_hypersolver(net, tmp_path / "h.pt"))}


def run(f, z0, compact: str, kw: dict):
    return solve(f, z0, max_iter=MAX_ITER, tol=TOL, compact=compact, **kw)


@pytest.mark.parametrize("solver", SOLVERS)
def test_compacted_solve_equals_each_sample_solved_alone(solver, tmp_path):
    kw = solver_kwargs(solver, tmp_path)
    cell, (x, s) = MixedCell(), batch()
    f = Counted(cell, x, s)
    z, stats = run(f, torch.zeros_like(x), "on", kw)
    assert stats.converged.all(), stats.stop_reason
    # Compaction happened: the easy half left early, and the batch only ever shrinks.
    assert f.rows[0] == 6 and min(f.rows) <= 3 and sum(f.rows) < 6 * stats.nfe
    assert all(a >= b for a, b in zip(f.rows, f.rows[1:]))
    for i in range(x.shape[0]):
        alone = Counted(cell, x[i : i + 1], s[i : i + 1])
        zi, si = run(alone, torch.zeros_like(x[:1]), "on", kw)
        torch.testing.assert_close(z[i], zi[0], rtol=0, atol=1e-10)
        assert stats.nstep[i] == si.nstep[0] and stats.steps[i] == si.steps[0]
        torch.testing.assert_close(stats.rel_res[i], si.rel_res[0], rtol=1e-6, atol=1e-15)


@pytest.mark.parametrize("solver", SOLVERS)
def test_compaction_changes_only_the_work_not_the_result(solver, tmp_path):
    kw = solver_kwargs(solver, tmp_path)
    cell, (x, s) = MixedCell(), batch()
    on, off = Counted(cell, x, s), Counted(cell, x, s)
    z_on, st_on = run(on, torch.zeros_like(x), "on", kw)
    z_off, st_off = run(off, torch.zeros_like(x), "off", kw)
    torch.testing.assert_close(z_on, z_off, rtol=0, atol=1e-10)
    assert torch.equal(st_on.nstep, st_off.nstep) and torch.equal(st_on.status, st_off.status)
    assert st_on.nfe == st_off.nfe and st_on.abs_trace.shape == st_off.abs_trace.shape
    assert set(off.rows) == {6}  # off: f always sees the whole batch
    assert sum(on.rows) < sum(off.rows)


@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_result_does_not_depend_on_batch_companions(solver):
    cell, (x, s) = MixedCell(), batch(8, seed=1)
    z_all, _ = run(Counted(cell, x, s), torch.zeros_like(x), "on", {"solver": solver})
    pick = torch.tensor([5, 0, 3])  # another batch holding three of the same samples
    z_sub, _ = run(
        Counted(cell, x[pick], s[pick]), torch.zeros_like(x[pick]), "on", {"solver": solver}
    )
    torch.testing.assert_close(z_sub, z_all[pick], rtol=0, atol=1e-10)


@pytest.mark.parametrize("solver", SOLVERS)
def test_tuple_state_compacts_and_matches_single_samples(solver, tmp_path):
    cell = PairCell()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(4, 12, generator=g, dtype=torch.float64)
    x[::2] *= 0.01  # samples 0 and 2 start next to their fixed point
    seen: list[int] = []

    def f(z, index=None):
        seen.append(z[0].shape[0])
        return cell(z, x if index is None else x[index])

    def zeros(n: int):
        return (torch.zeros(n, 3, 4, dtype=torch.float64), torch.zeros(n, 6, dtype=torch.float64))

    kw = solver_kwargs(solver, tmp_path)
    if solver == "hyperanderson":  # the weights file fixes the state size
        net = HyperAndersonNet(dim=18, m=9).double()
        kw["path"] = str(save_hypersolver(net, tmp_path / "pair.pt"))
    (h, v), stats = run(f, zeros(4), "on", kw)
    assert stats.converged.all() and min(seen) < 4
    assert type(h) is torch.Tensor and h.shape == (4, 3, 4) and v.shape == (4, 6)
    for i in range(4):
        xi = x[i : i + 1]
        (hi, vi), _ = run(lambda z, index=None, xi=xi: cell(z, xi), zeros(1), "on", kw)
        torch.testing.assert_close(h[i], hi[0], rtol=0, atol=1e-10)
        torch.testing.assert_close(v[i], vi[0], rtol=0, atol=1e-10)


def test_f_without_index_is_never_compacted():
    cell, (x, s) = MixedCell(), batch()
    seen: list[int] = []

    def f(z):  # no ``index``: it cannot say which injection rows go with z's rows
        seen.append(z.shape[0])
        return cell(z, x, s)

    assert not takes_index(f) and takes_index(Counted(cell, x, s))
    _, stats = run(f, torch.zeros_like(x), "on", {"solver": "anderson"})
    assert stats.converged.all() and set(seen) == {6}


def test_bad_compact_value_names_the_option():
    with pytest.raises(ValueError, match=r"compact must be one of \('off', 'eval', 'on'\)"):
        solve(lambda z: z, torch.zeros(2, 3), compact=True)


class DropoutCell(nn.Module):
    """A cell with a per-forward dropout mask over the batch (as in the model families)."""

    def __init__(self) -> None:
        super().__init__()
        self.cell = MixedCell()
        self.drop = VariationalDropout(0.3)

    def forward(self, z: Tensor, x: Tensor, s: Tensor) -> Tensor:
        return self.drop(self.cell(z, x, s))


def test_layer_compacts_in_eval_by_default_and_dropout_masks_follow_the_rows():
    model, (x, s) = DropoutCell(), batch()
    f = Counted(model, x, s)
    deq = DEQ(solver_opts={"max_iter": MAX_ITER, "tol": TOL})
    deq.eval()
    model.eval()
    deq(f, torch.zeros_like(x))
    assert min(f.rows) <= 3  # eval: "eval" means on
    f.rows.clear()
    deq.train()
    model.train()
    deq(f, torch.zeros_like(x))
    assert set(f.rows) == {6}  # training: "eval" means off
    # Compaction forced on in training: the dropout mask drawn on the full batch is read back
    # on the rows still solved, so the output equals the uncompacted one with the same mask.
    outs = {}
    for mode in ("on", "off"):
        torch.manual_seed(7)
        with deq.override(solver_opts={"compact": mode}):
            z, stats = deq(Counted(model, x, s), torch.zeros_like(x))
        outs[mode] = z
        assert stats.forward.converged.all()
    torch.testing.assert_close(outs["on"], outs["off"], rtol=0, atol=1e-9)


def test_trajectory_states_are_whole_batches_equal_to_uncompacted():
    cell, (x, s) = MixedCell(), batch()
    deq = DEQ(solver_opts={"max_iter": 40, "tol": TOL}).eval()
    trajs = {}
    for mode in ("on", "off"):
        with deq.override(eval_solver_opts={"compact": mode}):
            trajs[mode], _ = deq.trajectory(Counted(cell, x, s), torch.zeros_like(x), 4)
    for a, b in zip(trajs["on"], trajs["off"]):
        assert a.shape == x.shape
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
