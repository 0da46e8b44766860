import pytest
import torch
from torch import nn

from deq_lightning.deq import DEQ, deq_override, list_backwards

from .problems import PairCell, TanhCell

TIGHT = {"tol": 1e-13, "max_iter": 300}
TIGHT_BWD = {"tol": 1e-13, "max_iter": 300}


def loss_of(z):
    leaves = [z] if isinstance(z, torch.Tensor) else list(z)
    return sum((t.pow(2) + torch.sin(t)).sum() for t in leaves)


def grads(deq, cell, x, z0, n_calls=1):
    f = lambda z: cell(z, x)  # noqa: E731
    total = 0
    for _ in range(n_calls):
        z, stats = deq(f, z0)
        total = total + loss_of(z) / n_calls
    params = [*cell.parameters(), x]
    return torch.autograd.grad(total, params), stats


def rel_err(gs, ref):
    return max(((a - b).norm() / b.norm()).item() for a, b in zip(gs, ref))


def tensor_case():
    return (
        TanhCell(norm=0.9),
        torch.randn(4, 16, dtype=torch.float64, requires_grad=True),
        torch.zeros(4, 16, dtype=torch.float64),
    )


def pair_case():
    z0 = (torch.zeros(3, 3, 4, dtype=torch.float64), torch.zeros(3, 6, dtype=torch.float64))
    return PairCell(), torch.randn(3, 12, dtype=torch.float64, requires_grad=True), z0


@pytest.fixture(params=["tensor", "pair"])
def case(request):
    return tensor_case() if request.param == "tensor" else pair_case()


def exact_grads(cell, x, z0):
    """Autograd through a long, fully converged unroll (the reference)."""
    deq = DEQ(backward="unrolled", backward_opts={"steps": 600})
    return grads(deq, cell, x, z0)[0]


def test_backward_registry():
    assert set(list_backwards()) == {"implicit", "phantom", "one_step", "unrolled"}
    with pytest.raises(ValueError, match="known modes: implicit, one_step, phantom, unrolled"):
        DEQ(backward="adjoint")


@pytest.mark.parametrize("solver", ["anderson", "broyden", "fixed_point"])
def test_implicit_gradient_is_exact(case, solver):
    cell, x, z0 = case
    ref = exact_grads(cell, x, z0)
    deq = DEQ(solver=solver, solver_opts=TIGHT, backward_opts=TIGHT_BWD)
    g, stats = grads(deq, cell, x, z0)
    assert rel_err(g, ref) < 1e-6
    assert stats.backward is not None and stats.backward.converged.all()


def test_finite_differences_agree():
    cell, x, z0 = tensor_case()
    deq = DEQ(solver_opts=TIGHT, backward_opts=TIGHT_BWD)
    (gw, *_), _ = grads(deq, cell, x, z0)
    i, j, eps = 2, 5, 1e-6

    def loss_at(delta):
        with torch.no_grad():
            cell.w[i, j] += delta
            z, _ = deq(lambda z: cell(z, x), z0)
            cell.w[i, j] -= delta
        return loss_of(z).item()

    fd = (loss_at(eps) - loss_at(-eps)) / (2 * eps)
    assert abs(fd - gw[i, j].item()) < 1e-6 * max(1.0, abs(fd))


def test_phantom_approaches_implicit_as_steps_grow(case):
    cell, x, z0 = case
    ref = exact_grads(cell, x, z0)
    errs = []
    for k in (1, 3, 10, 40):
        deq = DEQ(solver_opts=TIGHT, backward="phantom", backward_opts={"steps": k, "tau": 0.8})
        errs.append(rel_err(grads(deq, cell, x, z0)[0], ref))
    assert errs == sorted(errs, reverse=True), errs
    assert errs[-1] < 1e-4 < errs[0]


def test_one_step_is_phantom_with_one_full_step():
    cell, x, z0 = tensor_case()
    g1, _ = grads(DEQ(solver_opts=TIGHT, backward="one_step"), cell, x, z0)
    g2, _ = grads(
        DEQ(solver_opts=TIGHT, backward="phantom", backward_opts={"steps": 1, "tau": 1.0}),
        cell,
        x,
        z0,
    )
    assert rel_err(g1, g2) < 1e-12


def test_unrolled_equals_manual_backprop():
    cell, x, z0 = tensor_case()
    g, stats = grads(DEQ(backward="unrolled", backward_opts={"steps": 3}), cell, x, z0)
    z = z0
    for _ in range(3):
        z = cell(z, x)
    ref = torch.autograd.grad(loss_of(z), [*cell.parameters(), x])
    assert rel_err(g, ref) < 1e-12
    assert stats.forward.nfe == 3 and (stats.nstep == 3).all()


def test_two_calls_before_one_backward(case):
    cell, x, z0 = case
    ref = exact_grads(cell, x, z0)
    deq = DEQ(solver_opts=TIGHT, backward_opts=TIGHT_BWD)
    g, _ = grads(deq, cell, x, z0, n_calls=2)
    assert rel_err(g, ref) < 1e-6


def test_chained_calls_in_one_graph():
    # The second DEQ's injection depends on the first one's equilibrium.
    cell = TanhCell(norm=0.8)
    x = torch.randn(2, 16, dtype=torch.float64, requires_grad=True)
    z0 = torch.zeros(2, 16, dtype=torch.float64)

    def run(deq):
        z1, _ = deq(lambda z: cell(z, x), z0)
        z2, _ = deq(lambda z: cell(z, 0.5 * z1), z0)
        return torch.autograd.grad(loss_of(z2), [cell.w, x])

    ref = run(DEQ(backward="unrolled", backward_opts={"steps": 500}))
    assert rel_err(run(DEQ(solver_opts=TIGHT, backward_opts=TIGHT_BWD)), ref) < 1e-6


def test_backward_stops_at_tolerance():
    cell, x, z0 = tensor_case()
    deq = DEQ(solver_opts=TIGHT, backward_opts={"tol": 1e-8, "max_iter": 200})
    _, stats = grads(deq, cell, x, z0)
    assert stats.backward.converged.all()
    assert stats.backward.nfe < 200
    assert (stats.backward.rel_res < 1e-8).all()


def test_backward_opts_are_validated():
    with pytest.raises(ValueError, match=r"backward_opts: unknown option\(s\) \['m_typo'\]"):
        DEQ(backward_opts={"m_typo": 3})
    with pytest.raises(ValueError, match="backward_opts: unknown solver 'newton'"):
        DEQ(backward_opts={"solver": "newton"})
    with pytest.raises(ValueError, match=r"unknown backward_opts \['tol'\] for backward 'phantom'"):
        DEQ(backward="phantom", backward_opts={"tol": 1e-3})
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        DEQ(backward="unrolled", backward_opts={"steps": 0})
    with pytest.raises(ValueError, match="eval_solver_opts: max_iter must be"):
        DEQ(eval_solver_opts={"max_iter": -3})


def test_eval_budget_applies_in_eval_mode_only():
    cell, x, z0 = tensor_case()
    deq = DEQ(solver_opts={"max_iter": 4, "tol": 1e-12}, eval_solver_opts={"max_iter": 9})
    _, train_stats = deq(lambda z: cell(z, x), z0)
    deq.eval()
    with torch.no_grad():
        _, eval_stats = deq(lambda z: cell(z, x), z0)
    assert train_stats.forward.max_iter == 4 and train_stats.forward.nfe == 4
    assert eval_stats.forward.max_iter == 9 and eval_stats.forward.nfe == 9


def test_eval_solver_solves_in_eval_mode_only():
    """``eval_solver``: plain iteration trains, Anderson evaluates (the common options carry over,
    the training solver's own do not), reaching the same fixed point in fewer steps."""
    cell, x, z0 = tensor_case()
    deq = DEQ(
        solver="fixed_point",
        solver_opts={"max_iter": 200, "tol": 1e-8, "damping": 0.1},
        eval_solver="anderson",
        eval_solver_opts={"m": 3},
    )
    z_train, train_stats = deq(lambda z: cell(z, x), z0)
    deq.eval()
    assert deq.active_solver() == "anderson" and deq.active_solver(eval_mode=False) == "fixed_point"
    opts = deq.active_solver_opts()
    assert (opts["max_iter"], opts["tol"], opts["m"]) == (200, 1e-8, 3) and "damping" not in opts
    with torch.no_grad():
        z_eval, eval_stats = deq(lambda z: cell(z, x), z0)
    assert (train_stats.forward.solver, eval_stats.forward.solver) == ("fixed_point", "anderson")
    assert train_stats.forward.converged.all() and eval_stats.forward.converged.all()
    assert eval_stats.forward.nfe < train_stats.forward.nfe
    assert torch.allclose(z_eval, z_train.detach(), atol=1e-6)
    with deq.override(eval_solver=None):  # back to the training solver: Anderson's m goes
        assert deq.active_solver() == "fixed_point" and "m" not in deq.active_solver_opts()
    with pytest.raises(ValueError, match="eval_solver: unknown solver 'newton'"):
        DEQ(eval_solver="newton")
    with pytest.raises(ValueError, match=r"eval_solver_opts: unknown option\(s\) \['memory'\]"):
        DEQ(eval_solver="anderson", eval_solver_opts={"memory": 4})


def test_override_switches_and_restores():
    cell, x, z0 = tensor_case()
    model = nn.ModuleDict({"a": DEQ(backward_opts={"tol": 1e-7}), "b": DEQ()})
    with deq_override(model, backward="unrolled", backward_opts={"steps": 2}) as deqs:
        assert len(deqs) == 2
        _, stats = model["a"](lambda z: cell(z, x), z0)
        assert stats.mode == "unrolled" and stats.forward.nfe == 2
    assert model["a"].backward == "implicit" and model["a"].backward_opts == {"tol": 1e-7}
    with model["a"].override(solver_opts={"max_iter": 3}):
        _, stats = model["a"](lambda z: cell(z, x), z0)
        assert stats.forward.max_iter == 3
    with pytest.raises(ValueError, match="cannot override"), model["a"].override(solvr="broyden"):
        pass


def test_trajectory_states_carry_gradients():
    cell, x, z0 = tensor_case()
    deq = DEQ(
        solver_opts={"max_iter": 12, "tol": 1e-14}, backward="phantom", backward_opts={"steps": 2}
    )
    states, _stats = deq.trajectory(lambda z: cell(z, x), z0, n_states=3)
    assert len(states) == 3
    # Earlier states are further from the fixed point than later ones.
    res = [(cell(s, x) - s).norm().item() for s in states]
    assert res[0] > res[1] > res[2]
    for s in states:
        (g,) = torch.autograd.grad(loss_of(s), x, retain_graph=True)
        assert torch.isfinite(g).all() and g.abs().sum() > 0
    z, _ = deq(lambda z: cell(z, x), z0)
    torch.testing.assert_close(states[-1], z)


def test_trajectory_pads_with_fixed_point_when_solve_stops_early():
    cell, x, z0 = tensor_case()
    deq = DEQ(solver_opts={"max_iter": 200, "tol": 1e-3}, backward="one_step")
    states, stats = deq.trajectory(lambda z: cell(z, x), z0, n_states=4)
    assert stats.forward.nfe < 50 and len(states) == 4
    torch.testing.assert_close(states[-1], states[-2])


@pytest.mark.parametrize("backward", ["implicit", "phantom", "unrolled"])
def test_jac_loss_and_spectral_radius_on_request(backward):
    cell, x, z0 = tensor_case()
    deq = DEQ(backward=backward, solver_opts={"tol": 1e-10, "max_iter": 100})
    _, stats = deq(lambda z: cell(z, x), z0)
    assert stats.jac_loss is None and stats.spectral_radius is None
    with deq.override(compute_jac_loss=True, compute_spectral_radius=True):
        _z, stats = deq(lambda z: cell(z, x), z0)
    assert stats.jac_loss.requires_grad and stats.jac_loss > 0
    (gw,) = torch.autograd.grad(stats.jac_loss, cell.w)
    assert gw.abs().sum() > 0
    assert stats.spectral_radius.shape == (4,) and (stats.spectral_radius < 0.9 + 1e-6).all()
    metrics = stats.metrics()
    assert {"fwd_nstep", "fwd_abs_res", "fwd_rel_res", "jac_loss", "spectral_radius"} <= set(
        metrics
    )


@pytest.mark.parametrize("backward", ["implicit", "phantom"])
def test_residual_loss_on_request_with_a_model_measure(backward):
    cell, x, z0 = tensor_case()
    deq = DEQ(backward=backward, solver_opts={"tol": 1e-3, "max_iter": 4})
    _, stats = deq(lambda z: cell(z, x), z0)
    assert stats.residual_loss is None
    with deq.override(compute_residual_loss=True):
        _, stats = deq(lambda z: cell(z, x), z0)
    assert stats.residual_loss.requires_grad and stats.residual_loss > 0
    (gw,) = torch.autograd.grad(stats.residual_loss, cell.w)
    assert gw.abs().sum() > 0
    assert "residual_loss" in stats.metrics()
    # A model's own measure replaces the relative residual (DEQ-Flow: its flow update).
    seen = []
    deq.residual_measure = lambda fz, z: seen.append((fz, z)) or (fz - z).abs().sum()
    with deq.override(compute_residual_loss=True), torch.no_grad():
        _, stats = deq(lambda z: cell(z, x), z0)
    assert stats.residual_loss is None and not seen  # nothing to train without a graph
    with deq.override(compute_residual_loss=True):
        _, stats = deq(lambda z: cell(z, x), z0)
    ((fz, z),) = seen
    torch.testing.assert_close(stats.residual_loss, (fz - z).abs().sum())


def test_float32_under_bf16_autocast_trains():
    lin = nn.Linear(24, 24)
    with torch.no_grad():
        lin.weight.mul_(0.7 / torch.linalg.matrix_norm(lin.weight, 2))
    x = torch.randn(4, 24, requires_grad=True)
    deq = DEQ(solver_opts={"tol": 1e-3, "max_iter": 30}, backward_opts={"tol": 1e-4})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z, stats = deq(lambda z: torch.tanh(lin(z) + x), torch.zeros(4, 24))
        loss = z.float().pow(2).sum()
    loss.backward()
    assert stats.forward.converged.all() and stats.forward.abs_res.dtype == torch.float32
    assert torch.isfinite(lin.weight.grad).all() and lin.weight.grad.abs().sum() > 0
