"""DEQ-Flow: shapes and gradients, thesis sizes, convex upsampling, padding, warm start, frozen BN,
mixed precision, the fixed-point correction loss, and the benchmark metrics."""

from __future__ import annotations

import pytest
import torch

from deq_lightning.deq import deq_override
from deq_lightning.metrics import finalize_flow_metrics, flow_length, flow_metric_sums
from deq_lightning.models.deq_flow import DEQFlow, fixed_point_correction_loss, forward_interpolate
from deq_lightning.models.flow_layers import InputPadder, convex_upsample

FAST_DEQ = {
    "solver": "fixed_point",
    "backward": "phantom",
    "solver_opts": {"max_iter": 6},
    "backward_opts": {"steps": 1, "tau": 1.0},
}


def tiny(**kwargs: object) -> DEQFlow:
    return DEQFlow("tiny", corr_levels=3, **{"deq": FAST_DEQ, **kwargs})


def frames(b: int = 2, h: int = 64, w: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(b, 3, h, w, generator=g) * 255, torch.rand(b, 3, h, w, generator=g) * 255


def test_tiny_forward_backward() -> None:
    model = tiny(n_states=3)
    img1, img2 = frames()
    out, stats = model(img1, img2)
    assert len(out["flow_preds"]) == 3 and out["flow"] is out["flow_preds"][-1]
    assert out["flow"].shape == (2, 2, 64, 64) and out["flow_low"].shape == (2, 2, 8, 8)
    assert out["state"][0].shape == (2, model.hidden_dim, 8, 8)
    assert stats.forward.nstep.shape == (2,)
    loss = fixed_point_correction_loss(out["flow_preds"], torch.zeros(2, 2, 64, 64))
    loss.backward()
    for name in ("feature_encoder", "context_encoder", "update_block", "mask_predictor"):
        grads = [p.grad for p in getattr(model, name).parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert any(g.abs().sum() > 0 for g in grads), name
    model.eval()
    with torch.no_grad():
        out, _ = model(img1, img2)
    assert len(out["flow_preds"]) == 1


@pytest.mark.parametrize(
    "backward, opts",
    [
        ("implicit", {"max_iter": 8}),
        ("phantom", {"steps": 2, "tau": 0.8}),
        ("one_step", {}),
        ("unrolled", {"steps": 3}),
    ],
)
def test_backward_modes(backward: str, opts: dict) -> None:
    model = tiny(n_states=2)
    img1, img2 = frames(1)
    with deq_override(model, backward=backward, backward_opts=opts):
        out, _ = model(img1, img2)
        fixed_point_correction_loss(out["flow_preds"], torch.ones(1, 2, 64, 64)).backward()
    grads = [p.grad for p in model.update_block.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)


def test_all_grad_lets_gradient_through_the_flow() -> None:
    """With the flow detached inside f (the thesis default), the first of 2 unrolled steps cannot
    reach the loss through its flow update, so the flow head gets gradient from step 2 only;
    ``all_grad`` lets step 1's update through as well."""
    img1, img2 = frames(1)
    target = torch.full((1, 2, 64, 64), 2.0)
    grads = []
    for all_grad in (False, True):
        torch.manual_seed(0)
        model = tiny(all_grad=all_grad, deq={"backward": "unrolled", "backward_opts": {"steps": 2}})
        out, _ = model(img1, img2)
        fixed_point_correction_loss(out["flow_preds"], target).backward()
        grads.append(model.update_block.flow_head.conv1.weight_v.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


def test_all_grad_is_inert_with_one_phantom_step() -> None:
    """One phantom step starts from the solver's state, which has no history: detaching its flow
    changes nothing, so ``all_grad`` gives the same gradients there (flow_tiny's training)."""
    img1, img2 = frames(1)
    target = torch.full((1, 2, 64, 64), 2.0)
    grads = []
    for all_grad in (False, True):
        torch.manual_seed(0)
        opts = {"steps": 1, "tau": 0.8}
        model = tiny(all_grad=all_grad, n_states=3, deq={**FAST_DEQ, "backward_opts": opts})
        out, _ = model(img1, img2)
        fixed_point_correction_loss(out["flow_preds"], target).backward()
        grads.append([p.grad.clone() for p in model.update_block.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*grads))
    assert any(g.abs().sum() > 0 for g in grads[0])


def test_residual_term_is_the_flow_update_in_pixels() -> None:
    """``compute_residual_loss`` on DEQ-Flow measures f's flow update at the last state (x8, in
    full-resolution pixels), not the hidden state's change, and trains the update block."""
    model = tiny()
    img1, img2 = frames(1)
    seen = []
    measure = model.deq.residual_measure

    def spy(fz, z):
        seen.append((fz, z))
        return measure(fz, z)

    model.deq.residual_measure = spy
    with deq_override(model, compute_residual_loss=True):
        _out, stats = model(img1, img2)
    ((fz, z),) = seen
    assert fz[0].shape == (1, model.hidden_dim, 8, 8) and fz[1].shape == (1, 2, 8, 8)
    torch.testing.assert_close(stats.residual_loss, 8 * (fz[1] - z[1]).abs().mean())
    assert not torch.equal(fz[0], z[0])  # the hidden state moved, and is not counted
    stats.residual_loss.backward()
    grad = model.update_block.flow_head.conv2.weight_v.grad
    assert grad is not None and grad.abs().sum() > 0


def test_thesis_sizes_parameter_counts() -> None:
    """B and H match the counts printed by deq-flow (v1 ``ref/val.txt``: 5.243M; v2
    ``log/val.txt``: 13.395M); hidden widths 128/192/256."""
    counts = {}
    for size in ("B", "L", "H"):
        model = DEQFlow(size)
        counts[size] = sum(p.numel() for p in model.parameters())
        assert model.hidden_dim == {"B": 128, "L": 192, "H": 256}[size]
    assert round(counts["B"] / 1e6, 3) == 5.243
    assert round(counts["H"] / 1e6, 3) == 13.395
    assert counts["B"] < counts["L"] < counts["H"]


def test_tiny_wide_widens_only_the_update_block() -> None:
    """``tiny_wide`` (SIZES' comment): tiny's encoders and hidden width, a wider update block,
    0.94M parameters at 3 levels against RAFT-small's 0.99M (tests/models/test_raft.py)."""

    def count(module: torch.nn.Module) -> int:
        return sum(p.numel() for p in module.parameters())

    tiny, wide = (DEQFlow(s, corr_levels=3, hidden_init="context") for s in ("tiny", "tiny_wide"))
    assert wide.hidden_dim == tiny.hidden_dim == 32
    for part in ("feature_encoder", "context_encoder", "mask_predictor"):
        assert count(getattr(wide, part)) == count(getattr(tiny, part))
    assert count(wide.update_block) > 1.9 * count(tiny.update_block)
    assert round(count(wide) / 1e6, 2) == 0.94
    out = wide(torch.rand(2, 3, 64, 64) * 255, torch.rand(2, 3, 64, 64) * 255).output
    assert out["flow"].shape == (2, 2, 64, 64) and torch.isfinite(out["flow"]).all()


def test_small_is_raft_small_as_a_deq() -> None:
    """``small`` (SIZES' comment) has torchvision's raft_small encoders, motion encoder, ConvGRU
    and flow head, layer for layer (its context encoder without normalisation, as RAFT-small's);
    the DEQ adds the convex-upsampling mask."""
    from torchvision.models.optical_flow import raft_small

    def shapes(module: torch.nn.Module) -> list[tuple[int, ...]]:
        return [tuple(p.shape) for p in module.parameters()]

    raft = raft_small()
    deq = DEQFlow("small", corr_radius=3, hidden_init="context", weight_norm=False)
    assert (deq.hidden_dim, deq.context_dim) == (96, 64)
    for part in ("feature_encoder", "context_encoder", "update_block"):
        assert shapes(getattr(deq, part)) == shapes(getattr(raft, part)), part
    out = deq(torch.rand(2, 3, 128, 128) * 255, torch.rand(2, 3, 128, 128) * 255).output
    assert out["flow"].shape == (2, 2, 128, 128) and torch.isfinite(out["flow"]).all()


@pytest.mark.parametrize(
    "size, norm, expected",
    [
        ("small", None, None),
        ("small", "batch", torch.nn.BatchNorm2d),
        ("tiny", None, torch.nn.BatchNorm2d),
        ("tiny", "instance", torch.nn.InstanceNorm2d),
    ],
)
def test_context_norm(size: str, norm: str | None, expected: type | None) -> None:
    """``context_norm`` picks the context encoder's normalisation (``None``: the size's)."""
    encoder = DEQFlow(size, corr_levels=3, context_norm=norm).context_encoder
    norms = {
        type(m)
        for m in encoder.modules()
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.InstanceNorm2d))
    }
    assert norms == (set() if expected is None else {expected})
    with pytest.raises(ValueError, match="unknown context_norm 'group'"):
        DEQFlow(size, corr_levels=3, context_norm="group")


def test_convex_upsampling_of_constant_flow() -> None:
    flow = torch.empty(2, 2, 5, 6)
    flow[:, 0], flow[:, 1] = 1.5, -0.25
    mask = torch.randn(2, 9 * 64, 5, 6) * 3
    up = convex_upsample(flow, mask)
    assert up.shape == (2, 2, 40, 48)
    # Interior pixels: every neighbour holds the same vector, so any convex weights give it x8.
    assert torch.allclose(up[:, 0, 8:-8, 8:-8], torch.tensor(12.0))
    assert torch.allclose(up[:, 1, 8:-8, 8:-8], torch.tensor(-2.0))


def test_convex_upsampling_picks_the_weighted_neighbour() -> None:
    flow = torch.arange(9.0).view(1, 1, 3, 3).repeat(1, 2, 1, 1)
    mask = torch.full((1, 9, 8, 8, 3, 3), -1e4)
    mask[:, 5] = 1e4  # neighbour 5 of the 3x3 window: same row, one column right
    up = convex_upsample(flow, mask.view(1, 9 * 64, 3, 3))
    # coarse (1, 1) -> its right neighbour (1, 2) holds 5; scaled by 8
    assert torch.allclose(up[0, 0, 8:16, 8:16], torch.tensor(40.0))


@pytest.mark.parametrize("mode, pads", [("sintel", (1, 2, 2, 2)), ("kitti", (1, 2, 0, 4))])
def test_input_padder(mode: str, pads: tuple[int, ...]) -> None:
    x = torch.randn(1, 3, 116, 61)  # -> 120 x 64
    padder = InputPadder(x.shape, mode)
    assert padder.pads == pads
    padded = padder.pad(x)
    assert padded.shape[-2:] == (120, 64)
    assert torch.equal(padder.unpad(padded), x)


def test_any_image_size_is_padded_inside() -> None:
    model = tiny().eval()
    img1, img2 = frames(1, 70, 75)
    with torch.no_grad():
        out, _ = model(img1, img2, pad_mode="kitti")
    assert out["flow"].shape == (1, 2, 70, 75) and out["flow_low"].shape == (1, 2, 9, 10)


def test_bad_inputs_are_explained() -> None:
    model = tiny().eval()
    with pytest.raises(ValueError, match="at least 64x64"):
        model(*frames(1, 48, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.zeros(1, 1, 64, 64), torch.zeros(1, 1, 64, 64))
    img1, img2 = frames(1)
    with pytest.raises(ValueError, match="not both"):
        model(
            img1,
            img2,
            flow_init=torch.zeros(1, 2, 8, 8),
            state_init=(torch.zeros(1), torch.zeros(1)),
        )
    with pytest.raises(ValueError, match="flow_init has shape"):
        model(img1, img2, flow_init=torch.zeros(1, 2, 4, 4))
    with pytest.raises(ValueError, match="unknown DEQ-Flow size"):
        DEQFlow("XL")


def test_warm_start_from_the_fixed_point_converges_faster() -> None:
    """Reusing the previous fixed point (``state_init``) needs fewer solver steps. A random model
    rarely has a fixed point; with a zero flow head (the flow stays put) and a contractive GRU
    (the hidden state settles) it has one, which the solver reaches to tolerance."""
    deq = {"solver": "anderson", "solver_opts": {"max_iter": 60, "tol": 1e-4, "stop_mode": "rel"}}
    model = DEQFlow("tiny", corr_levels=3, deq=deq).eval()
    with torch.no_grad():
        model.update_block.flow_head.conv2.weight_g.zero_()
        model.update_block.flow_head.conv2.bias.zero_()
        for name, p in model.update_block.recurrent_block.named_parameters():
            if name.endswith("weight_g"):
                p.mul_(0.3)  # a contractive GRU: the state converges instead of wandering
    img1, img2 = frames(1)
    flow_init = torch.full((1, 2, 8, 8), 0.5)
    with torch.no_grad():
        first, stats1 = model(img1, img2, flow_init=flow_init)
        second, stats2 = model(img1, img2, state_init=first["state"])
    assert bool(stats1.forward.converged.all()) and int(stats1.nstep) > 3
    assert int(stats2.nstep) < int(stats1.nstep)
    assert torch.allclose(second["flow_low"], first["flow_low"])
    assert torch.allclose(second["state"][0], first["state"][0], atol=1e-3)


def test_freeze_bn_survives_train_calls() -> None:
    model = tiny()
    model.freeze_bn()
    model.train()
    bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert bns and not any(m.training for m in bns)
    before = [m.running_mean.clone() for m in bns]
    model(*frames())
    assert all(torch.equal(m.running_mean, b) for m, b in zip(bns, before))
    assert model.update_block.training  # everything else still trains
    model.freeze_bn(False)
    assert all(m.training for m in bns)


def test_mixed_precision_keeps_state_in_float32() -> None:
    model = tiny(n_states=2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, stats = model(*frames(1))
    assert out["state"][0].dtype == torch.float32 and out["state"][1].dtype == torch.float32
    assert out["flow"].dtype == torch.float32 and torch.isfinite(out["flow"]).all()
    assert torch.isfinite(stats.forward.abs_res).all()


# ----------------------------------------------------------------------------------------------
# Loss, warm-start helper and metrics, against hand-computed values
# ----------------------------------------------------------------------------------------------


def test_fixed_point_correction_loss_weights_and_mask() -> None:
    gt = torch.zeros(1, 2, 2, 2)
    gt[0, 0, 1, 1] = 500.0  # |gt| >= 400: left out
    valid = torch.tensor([[[1.0, 1.0], [0.0, 1.0]]])  # pixel (1, 0) invalid
    preds = [gt + e for e in (4.0, 2.0, 1.0)]  # |error| e in both channels, everywhere
    # 2 counted pixels x 2 channels of 8 values: mean = e * 4 / 8.
    expected = 0.8**2 * 4.0 * 0.5 + 0.8 * 2.0 * 0.5 + 1.0 * 0.5
    loss = fixed_point_correction_loss(preds, gt, valid, gamma=0.8)
    assert loss.item() == pytest.approx(expected)
    assert fixed_point_correction_loss(preds[-1:], gt, valid, gamma=0.8).item() == pytest.approx(
        0.5
    )
    no_mask = fixed_point_correction_loss(preds, gt, gamma=0.9, max_flow=1e9)
    assert no_mask.item() == pytest.approx(0.81 * 4.0 + 0.9 * 2.0 + 1.0)


def test_forward_interpolate() -> None:
    flow = torch.zeros(1, 2, 6, 7)
    flow[:, 0] = 1.0  # everything moves one pixel right
    out = forward_interpolate(flow)
    assert torch.equal(out, flow)  # nearest moved vector is (1, 0) everywhere
    flow[:, 0] = 100.0  # everything leaves the frame
    assert torch.equal(forward_interpolate(flow), torch.zeros_like(flow))


def test_flow_metrics_by_hand() -> None:
    gt = torch.zeros(2, 2, 1, 4)
    gt[0, 0] = torch.tensor([10.0, 10.0, 100.0, 0.0])
    pred = gt.clone()
    pred[0, 0] += torch.tensor([0.5, 2.0, 4.0, 6.0])  # image 0 EPEs: 0.5, 2, 4, 6
    pred[1, 1] += torch.tensor([3.0, 4.0, 0.0, 0.0])  # image 1 EPEs: 3, 4, 0, 0
    sums = flow_metric_sums(pred, gt)
    m = finalize_flow_metrics(sums)
    assert m["epe"].item() == pytest.approx(19.5 / 8)
    assert m["1px"].item() == pytest.approx(100 * 3 / 8)
    assert m["3px"].item() == pytest.approx(100 * 4 / 8)
    assert m["5px"].item() == pytest.approx(100 * 7 / 8)
    # outliers: EPE > 3 and > 5% of |gt|: 4 (|gt| 100: 4 <= 5, no), 6 (|gt| 0: yes), 4 (|gt| 0: yes)
    assert m["f1_all"].item() == pytest.approx(100 * 2 / 8)
    assert m["image_epe"].item() == pytest.approx((12.5 / 4 + 7 / 4) / 2)

    # Sparse validity: KITTI counts only valid pixels, per image, and skips empty images.
    valid = torch.tensor([[[1.0, 0.0, 1.0, 1.0]], [[0.0, 0.0, 0.0, 0.0]]])
    sparse = finalize_flow_metrics(flow_metric_sums(pred, gt, valid))
    assert sparse["epe"].item() == pytest.approx(10.5 / 3)
    assert sparse["image_epe"].item() == pytest.approx(10.5 / 3)
    assert sparse["f1_all"].item() == pytest.approx(100 * 1 / 3)
    assert sums["pixels"].dtype == torch.int64 and sums["epe_sum"].dtype == torch.float64


def test_flow_length_is_the_vector_norm() -> None:
    g = torch.Generator().manual_seed(0)
    flow = torch.randn(3, 2, 5, 7, generator=g) * 50
    torch.testing.assert_close(flow_length(flow), torch.linalg.vector_norm(flow, dim=1))
    torch.testing.assert_close(
        flow_length(flow[0], dim=0), torch.linalg.vector_norm(flow[0], dim=0)
    )
    assert flow_length(torch.tensor([[3.0], [-4.0]]), dim=0).item() == 5.0


def test_metric_sums_add_up_across_batches() -> None:
    g = torch.Generator().manual_seed(0)
    pred, gt = torch.randn(4, 2, 3, 5, generator=g) * 5, torch.randn(4, 2, 3, 5, generator=g) * 5
    valid = (torch.rand(4, 3, 5, generator=g) > 0.3).float()
    whole = finalize_flow_metrics(flow_metric_sums(pred, gt, valid))
    a, b = (
        flow_metric_sums(pred[:1], gt[:1], valid[:1]),
        flow_metric_sums(pred[1:], gt[1:], valid[1:]),
    )
    split = finalize_flow_metrics({k: a[k] + b[k] for k in a})
    for key, value in whole.items():
        assert split[key].item() == pytest.approx(value.item())


def test_hidden_init_context_starts_from_the_context_encoder() -> None:
    """``hidden_init=context`` (RAFT's start): the solve begins at tanh of extra context channels,
    so the zero-iteration state is not zero, depends on frame 1 and trains the encoder."""
    zero, ctx = tiny(), tiny(hidden_init="context")
    out_channels = lambda m: m.context_encoder.conv.out_channels  # noqa: E731
    assert out_channels(ctx) == out_channels(zero) + ctx.hidden_dim
    img1, img2 = frames(2)
    with deq_override(ctx, solver_opts={"max_iter": 1}):
        captured = {}
        original = ctx._initial_state

        def spy(*args, **kwargs):
            captured["z0"] = original(*args, **kwargs)
            return captured["z0"]

        ctx._initial_state = spy
        out, _ = ctx(img1, img2)
    hidden0 = captured["z0"][0]
    assert hidden0.abs().max() > 0 and hidden0.abs().max() <= 1  # tanh, not zeros
    assert not torch.allclose(hidden0[0], hidden0[1])  # from each sample's frame 1
    out["flow"].abs().mean().backward()
    assert ctx.context_encoder.conv.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="hidden_init"):
        tiny(hidden_init="random")
