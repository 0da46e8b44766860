"""HyperAnderson: mixing weights, reduction to Anderson, training, its file, its errors."""

from functools import partial

import pytest
import torch
from torch import nn

from deq_lightning.app.hypersolver import HyperTrainOptions, evaluate_losses, fit, fit_initializer
from deq_lightning.deq import DEQ, HyperAndersonNet, capture_problems, save_hypersolver, solve
from deq_lightning.deq.hyper import _iterate, hyper_solve, load_hypersolver, mixing_weights
from deq_lightning.deq.kit import Monitor
from deq_lightning.deq.solvers import run_flat

from .problems import TanhCell

D = 16


class Model(nn.Module):
    """A DEQ layer around TanhCell: f(z) = tanh(W z + U x)."""

    def __init__(self, **deq) -> None:
        super().__init__()
        self.cell = TanhCell(D, norm=0.95, dtype=torch.float32)
        self.deq = DEQ(**deq)

    def forward(self, x):
        return self.deq(lambda z: self.cell(z, x), torch.zeros_like(x))


def problem(batch: int = 8, seed: int = 0):
    cell = TanhCell(D, norm=0.95, dtype=torch.float32)
    x = torch.randn(batch, D, generator=torch.Generator().manual_seed(seed))
    return (lambda z: cell(z, x)), torch.zeros(batch, D)


def perturbed(net: HyperAndersonNet, seed: int = 0, scale: float = 0.3) -> HyperAndersonNet:
    """Random non-zero weights (a large ``scale`` is not a good solver, only a different one)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(scale * torch.randn(p.shape, generator=g))
    return net


OPTS = dict(max_iter=40, tol=1e-7, stop_mode="rel", diverge_factor=1e3)


def test_mixing_weights_sum_to_one():
    alpha = torch.softmax(torch.randn(5, 7), 1)
    w = mixing_weights(alpha, 3 * torch.randn(5, 7))
    assert torch.allclose(w.sum(1), torch.ones(5), atol=1e-6)
    # The network's own corrections, at every history length, keep the sum at 1.
    net = perturbed(HyperAndersonNet(D, m=4))
    for n in range(1, 5):
        a = torch.softmax(torch.randn(3, n), 1)
        d, beta_logit = net.mix(torch.randn(3, n, net.pool), torch.rand(3, n) + 0.1, a, n)
        assert d.abs().sum() > 0 and beta_logit.shape == (3,)
        assert torch.allclose(mixing_weights(a, d).sum(1), torch.ones(3), atol=1e-6)


@pytest.mark.parametrize("zeroed", ["fresh", "all_zero"])
def test_zeroed_network_is_anderson(zeroed):
    f, x0 = problem()
    net = HyperAndersonNet(D, m=5)
    if zeroed == "all_zero":
        for p in perturbed(net).parameters():
            p.data.zero_()
    ref = run_flat("anderson", f, x0, {**OPTS, "m": 5})
    got = hyper_solve(net, f, x0, **OPTS, m=5)
    assert not net.mixes()  # so the solver skipped the mixer; run it anyway, too:
    mon = Monitor(x0, OPTS["tol"], OPTS["stop_mode"], OPTS["diverge_factor"])
    with torch.no_grad():
        _iterate(net, f, x0, OPTS["max_iter"], 5, 1e-4, 1.0, mon, mix=True)
    forced = mon.result("hyperanderson", OPTS["max_iter"], 0, [])
    for res in (got, forced):
        assert torch.equal(ref.stats.rel_trace, res.stats.rel_trace)
        assert torch.equal(ref.z, res.z)
    assert ref.stats.nfe == got.stats.nfe
    # ... and a network that is not zero does change the iterates.
    moved = hyper_solve(perturbed(net), f, x0, **OPTS, m=5)
    assert net.mixes()
    assert not torch.allclose(moved.stats.rel_trace[:5], ref.stats.rel_trace[:5])


def collect(model: Model, batches: int) -> list:
    long_solve = model.deq.override(solver_opts={"max_iter": 200, "tol": 1e-7})
    with torch.no_grad(), long_solve, capture_problems(model) as found:
        for s in range(batches):
            model(torch.randn(16, D, generator=torch.Generator().manual_seed(s)))
    return found


def test_capture_records_each_solve_with_its_fixed_point():
    model = Model(solver="anderson")
    found = collect(model, 2)
    assert len(found) == 2 and model.deq.on_solve is None
    p = found[0]
    assert p.x0.shape == (16, D) and torch.allclose(p.f(p.z_star), p.z_star, atol=1e-5)


def test_training_lowers_its_loss():
    torch.manual_seed(0)
    problems = collect(Model(solver="anderson"), 4)
    opts = HyperTrainOptions(steps=60, lr=1e-2, m=5, batches=4, holdout=0)

    def objective(net):  # the loss terms whose weight does not decay
        losses = evaluate_losses(net, problems, 8, opts.m, opts.lam, opts.beta)
        return losses["conv"] + opts.init_weight * losses["init"]

    net = HyperAndersonNet(D, m=5)
    before = objective(net)
    history = fit(net, problems, opts, 8, log=lambda s: None)
    assert len(history) == opts.steps
    assert objective(net) < 0.97 * before
    # The closed-form initializer fit lowers the initializer loss of a fresh network too.
    fresh = HyperAndersonNet(D, m=5)
    init_before = evaluate_losses(fresh, problems, 8, 5, opts.lam, opts.beta)["init"]
    fit_initializer(fresh, problems, opts.beta)
    assert evaluate_losses(fresh, problems, 8, 5, opts.lam, opts.beta)["init"] < init_before


def test_loads_from_its_file_and_runs_in_a_deq_layer(tmp_path):
    path = save_hypersolver(
        perturbed(HyperAndersonNet(D, m=5), seed=1, scale=0.03), tmp_path / "h.pt"
    )
    blob = torch.load(path, weights_only=True)
    assert blob["config"]["dim"] == D
    net, _ = load_hypersolver(path)
    assert all(
        torch.equal(a, b) for a, b in zip(net.state_dict().values(), blob["state_dict"].values())
    )
    opts = {"path": str(path), "m": 5, "max_iter": 60, "tol": 1e-6}
    model = Model(solver="hyperanderson", solver_opts=opts)
    x = torch.randn(4, D, requires_grad=True)
    z, stats = model(x)
    assert stats.forward.solver == "hyperanderson" and bool(stats.forward.converged.all())
    z.sum().backward()  # the implicit backward works as with any solver
    assert x.grad is not None and torch.isfinite(x.grad).all()
    # Same answer as the network run directly, and through the functional entry point.
    f, x0 = problem()
    direct = hyper_solve(net, f, x0, **OPTS, m=5)
    via_registry, st = solve(
        f, x0, solver="hyperanderson", path=str(path), m=5, max_iter=40, tol=1e-7
    )
    assert torch.equal(direct.z, via_registry) and st.nfe == direct.stats.nfe


def test_bad_file_size_or_history_is_explained(tmp_path):
    f, x0 = problem()
    with pytest.raises(ValueError, match="path must be the weights file"):
        DEQ(solver="hyperanderson")
    with pytest.raises(ValueError, match="does not exist; write it with"):
        DEQ(solver="hyperanderson", solver_opts={"path": str(tmp_path / "missing.pt")})
    bogus = tmp_path / "bogus.pt"
    torch.save({"weights": torch.zeros(3)}, bogus)
    with pytest.raises(ValueError, match="not a hyperanderson weights file"):
        solve(f, x0, solver="hyperanderson", path=str(bogus))
    other = save_hypersolver(HyperAndersonNet(D + 1, m=5), tmp_path / "other.pt")
    with pytest.raises(ValueError, match=f"state of {D + 1} values per sample.*has {D}"):
        solve(f, x0, solver="hyperanderson", path=str(other), m=5)
    with pytest.raises(ValueError, match=r"set solver\.m=5"):
        solve(f, x0, solver="hyperanderson", path=str(other), m=9)


def test_pointwise_initializer_takes_any_state_size():
    net = perturbed(HyperAndersonNet(D, m=5, init="pointwise"))
    for d in (D, 2 * D):
        cell, x = TanhCell(d, norm=0.9, dtype=torch.float32), torch.randn(3, d)
        res = hyper_solve(net, partial(cell, x=x), torch.zeros(3, d), **OPTS, m=5)
        assert res.z.shape == (3, d) and torch.isfinite(res.z).all()


def test_one_nan_sample_does_not_stop_the_others():
    f, x0 = problem(batch=4)

    def poisoned(z):
        out = f(z)
        out[1] = float("nan")
        return out

    res = hyper_solve(perturbed(HyperAndersonNet(D, m=5), scale=0.03), poisoned, x0, **OPTS, m=5)
    assert bool(res.stats.converged[[0, 2, 3]].all()) and not bool(res.stats.converged[1])
    assert torch.isfinite(res.z).all()
