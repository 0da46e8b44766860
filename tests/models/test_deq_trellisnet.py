import pytest
import torch

from deq_lightning.deq import deq_override, has_weight_norm
from deq_lightning.models.deq_trellisnet import DEQTrellisNetLM, History

V = 40
FAST = {"solver_opts": {"max_iter": 30, "tol": 1e-4}, "backward_opts": {"max_iter": 30}}
TIGHT = {"solver_opts": {"max_iter": 200, "tol": 1e-11}, "backward_opts": {"tol": 1e-11}}


def tiny(**kw) -> DEQTrellisNetLM:
    args = dict(vocab_size=V, d_embed=16, nhid=8, nout=16, dropout=0.0, dropouti=0.0)
    args.update(dropouth=0.0, adaptive=False, init_std=0.1, deq=FAST)
    return DEQTrellisNetLM(**{**args, **kw})


def contractive(**kw) -> DEQTrellisNetLM:
    """A double-precision instance whose solves reach 1e-11 (small recurrent weights, so f is a
    strong contraction): what tests of fixed-point properties need."""
    return tiny(deq=TIGHT, **kw).double().eval()


def tokens(B: int = 2, L: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(seed))


def perturbed(x: torch.Tensor, t: int) -> torch.Tensor:
    y = x.clone()
    y[:, t] = (y[:, t] + 1) % V
    return y


@pytest.mark.parametrize("depth", [0, 5])
def test_no_position_sees_the_future_unrolled_and_layered(depth):
    model = tiny(depth=depth).double().eval()
    mems = model(tokens(seed=2))[0].mems
    x, t = tokens(), 7
    with deq_override(model, backward="unrolled", backward_opts={"steps": 6}):
        a = model(x, mems=mems)[0].log_probs
        b = model(perturbed(x, t), mems=mems)[0].log_probs
    assert torch.equal(a[:, :t], b[:, :t])
    assert (a[:, t:] - b[:, t:]).abs().amax(dim=-1).min() > 1e-12


def test_no_position_sees_the_future_at_equilibrium():
    model = contractive()
    x, t = tokens(), 5
    (a, sa), (b, sb) = model(x), model(perturbed(x, t))
    assert sa.forward.converged.all() and sb.forward.converged.all()
    change = (a.log_probs - b.log_probs).abs().amax(dim=-1)  # (B, L)
    assert change[:, :t].max() < 1e-9  # solver noise only
    assert change[:, t].min() > 1e-4 and change[:, t + 1 :].min() > 1e-9


def test_segments_with_history_equal_one_joint_solve():
    # f is causal and the history holds everything f reads before a segment (hidden and cell
    # columns, the previous embedding), so the split solve equals the joint one.
    model = contractive()
    s1, s2 = tokens(L=8, seed=1), tokens(L=6, seed=2)
    joint = model(torch.cat([s1, s2], 1))[0]
    out1, st1 = model(s1)
    out2, st2 = model(s2, mems=out1.mems)
    assert st1.forward.converged.all() and st2.forward.converged.all()
    torch.testing.assert_close(out1.log_probs, joint.log_probs[:, :8], atol=1e-9, rtol=0)
    torch.testing.assert_close(out2.log_probs, joint.log_probs[:, 8:], atol=1e-9, rtol=0)
    assert not any(t.requires_grad for t in out2.mems)


def test_history_changes_the_next_segment():
    model = tiny().eval()
    second = tokens(seed=2)
    with_mem = model(second, mems=model(tokens(seed=1))[0].mems)[0].log_probs
    other = model(second, mems=model(tokens(seed=3))[0].mems)[0].log_probs
    fresh = model(second)[0].log_probs
    assert (with_mem - fresh).abs().max() > 1e-4
    assert (with_mem - other).abs().max() > 1e-4
    # Only the first positions read the history directly; later ones through the recurrence.
    assert (with_mem - fresh)[:, -1].abs().max() > 1e-7


def test_layered_twin_equals_the_deq_unrolled_on_a_new_stream():
    # The twin is the DEQ's layer applied `depth` times from zero state: on a stream that starts
    # here (zero history at every level) it is exactly the DEQ's unrolled pre-training mode.
    deq, twin = tiny().double().eval(), tiny(depth=4).double().eval()
    assert twin.deq is None and not any(type(m).__name__ == "DEQ" for m in twin.modules())
    twin.load_state_dict(deq.state_dict())  # the same parameters, name for name
    x = tokens()
    with deq_override(deq, backward="unrolled", backward_opts={"steps": 4}):
        expected = deq(x)[0].log_probs
    out, stats = twin(x)
    assert stats is None
    torch.testing.assert_close(out.log_probs, expected, atol=1e-12, rtol=0)


def test_layered_twin_keeps_one_history_per_level_and_splits_exactly():
    model = tiny(depth=3).double().eval()
    x = tokens(L=12, seed=5)
    joint = model(x)[0].log_probs
    first = model(x[:, :5])[0]
    second = model(x[:, 5:], mems=first.mems)[0]
    torch.testing.assert_close(torch.cat([first.log_probs, second.log_probs], 1), joint)
    h = first.mems.h
    assert h.shape == (2, 3, 24, 1)
    assert h[:, 0].abs().max() == 0  # level 0 reads the zero state
    assert not torch.allclose(h[:, 1], h[:, 2])


SOLVERS = ["anderson", "broyden", "fixed_point"]
BACKWARDS = [
    ("implicit", {"max_iter": 60, "tol": 1e-8}),
    ("phantom", {"steps": 3}),
    ("one_step", {}),
    ("unrolled", {"steps": 3}),
]


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("backward, bopts", BACKWARDS)
def test_every_solver_and_backward_trains_every_parameter(solver, backward, bopts):
    model = tiny(dropouth=0.1, dropouti=0.1, dropout=0.1, emb_dropout=0.1).double().train()
    x, y = tokens(seed=7), tokens(seed=8)
    mems = model(tokens(seed=9))[0].mems
    opts = {"max_iter": 60, "tol": 1e-8}
    with deq_override(
        model, solver=solver, solver_opts=opts, backward=backward, backward_opts=bopts
    ):
        out, stats = model(x, y, mems)
        out.nll.mean().backward()
    assert stats.mode == backward
    if backward != "unrolled":
        # One dropout mask and one normalised weight per call: f is a fixed map.
        assert stats.forward.converged.all(), stats.forward.stop_reason
    if backward == "implicit":
        assert stats.backward is not None and stats.backward.converged.all()
    missing = [
        n for n, p in model.named_parameters() if p.numel() and (p.grad is None or not p.grad.any())
    ]
    assert missing == []
    assert has_weight_norm(model.layer.conv) and has_weight_norm(model.inject)


def test_implicit_gradient_matches_backprop_through_the_converged_unroll():
    model = contractive()
    x, y = tokens(seed=3), tokens(seed=4)

    def grads(**changes) -> torch.Tensor:
        model.zero_grad()
        with deq_override(model, **changes):
            model(x, y)[0].nll.mean().backward()
        return model.layer.conv.weight_v.grad.clone()

    implicit = grads()
    unrolled = grads(backward="unrolled", backward_opts={"steps": 80})
    torch.testing.assert_close(implicit, unrolled, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"adaptive": True, "cutoffs": [10, 25]},
        {"n_experts": 3, "nout": 12, "dropoutl": 0.2},
    ],
)
def test_log_probs_sum_to_one_and_match_nll(kw):
    model = tiny(**kw).double().eval()
    x, y = tokens(seed=5), tokens(seed=6)
    y[0, :3] = torch.tensor([0, 15, 30])  # a target in every cluster
    log_probs = model(x)[0].log_probs
    assert log_probs.shape == (2, 12, V)
    torch.testing.assert_close(log_probs.logsumexp(-1), torch.zeros(2, 12, dtype=torch.float64))
    assert log_probs.std() > 1e-3
    nll = model(x, y)[0].nll
    torch.testing.assert_close(nll, -log_probs.gather(-1, y[..., None]).squeeze(-1))


def test_bad_inputs_and_configs_raise_clear_errors():
    model = tiny()
    with pytest.raises(ValueError, match="vocabulary has 40 words"):
        model(torch.full((1, 3), V))
    with pytest.raises(ValueError, match="LongTensor"):
        model(torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="targets"):
        model(tokens(), tokens()[:, :3])
    bad = History(torch.zeros(3, 1, 24, 1), torch.zeros(3, 1, 24, 1), torch.zeros(3, 16, 1))
    with pytest.raises(ValueError, match="B=2 streams"):
        model(tokens(), mems=bad)
    twin_mems = tiny(depth=2)(tokens())[0].mems
    with pytest.raises(ValueError, match="1 level"):
        model(tokens(), mems=twin_mems)
    with pytest.raises(ValueError, match=r"nout == model\.d_embed"):
        tiny(nout=12)
    with pytest.raises(ValueError, match="adaptive=false"):
        tiny(adaptive=True)  # the WikiText-103 cutoffs do not fit 40 words
    with pytest.raises(ValueError, match="plain softmax"):
        tiny(adaptive=True, cutoffs=[10], n_experts=2)
    with pytest.raises(ValueError, match=r"model\.depth"):
        tiny(depth=-1)
