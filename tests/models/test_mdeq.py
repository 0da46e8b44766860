import pickle

import pytest
import torch
from torch import nn

from deq_lightning.deq import deq_override, has_weight_norm, list_backwards
from deq_lightning.models.mdeq import MDEQBackbone, MDEQClassifier

STREAMS = {
    1: dict(channels=[4], head_channels=[2]),
    2: dict(channels=[4, 8], head_channels=[2, 4]),
    3: dict(channels=[4, 8, 8], head_channels=[2, 2, 4]),
    4: dict(channels=[4, 4, 8, 8], head_channels=[2, 2, 4, 4]),
}


def tiny(n_streams: int = 2, **overrides) -> MDEQClassifier:
    kwargs = dict(
        in_channels=1,
        num_classes=3,
        expansion=2,
        num_groups=2,
        dropout=0.0,
        final_channels=8,
        deq={"solver": "anderson", "solver_opts": {"max_iter": 8}},
        **STREAMS[n_streams],
    )
    kwargs.update(overrides)
    return MDEQClassifier(**kwargs)


def make_contractive(model: MDEQClassifier) -> MDEQClassifier:
    """Shrink gains until f is a contraction, so that plain iteration converges.

    MDEQ's group norms make each stream's block invariant to the scale of its own state, so a
    random init is no contraction (spectral radius about 1-2). Small post-fusion gains, small
    conv2 gains, small gains on the lower streams' block outputs and on the upsampling paths
    give a spectral radius of about 0.3 for the two-stream model below.
    """
    layer = model.backbone.layer
    with torch.no_grad():
        for post in layer.fusion.post:
            post[-1].weight.mul_(0.1)
        for i, block in enumerate(layer.blocks):
            block.conv2.weight_g.mul_(0.1)
            if i > 0:
                block.gn3.weight.mul_(0.1)
        for dst, paths in enumerate(layer.fusion.paths):
            for src in range(dst + 1, len(paths)):
                for m in paths[src].modules():
                    if isinstance(m, nn.GroupNorm):
                        m.weight.mul_(0.01)
    return model


@pytest.mark.parametrize("n_streams", [1, 2, 3, 4])
@pytest.mark.parametrize("downsample_times", [0, 2])
def test_stream_shapes_and_logits(n_streams, downsample_times):
    model = tiny(n_streams, downsample_times=downsample_times)
    x = torch.randn(2, 1, 20, 20)
    streams, stats = model.backbone(x)
    top = 20 // 2**downsample_times
    expected, size = [], top
    for c in STREAMS[n_streams]["channels"]:
        expected.append((2, c, size, size))
        size = (size + 1) // 2  # 20 -> 10 -> 5 -> 3: odd sizes work too
    assert [tuple(s.shape) for s in streams] == expected
    assert stats.forward.nstep.shape == (2,)
    logits, _ = model(x)
    assert logits.shape == (2, 3)


def test_injection_reaches_only_the_top_stream():
    model = tiny(3)
    seen, injected = {}, []
    model.backbone.injection.register_forward_hook(lambda m, i, out: injected.append(out))
    for k, block in enumerate(model.backbone.layer.blocks):
        block.register_forward_pre_hook(lambda m, args, k=k: seen.setdefault(k, args[1]))
    model(torch.randn(2, 1, 8, 8))
    assert seen[0] is injected[0]
    assert seen[1] is None and seen[2] is None


def test_initial_state_is_zero_at_every_resolution():
    backbone = MDEQBackbone(in_channels=1, channels=[4, 8, 8], expansion=2, num_groups=2)
    u = torch.randn(2, 4, 9, 7)
    zs = backbone.initial_state(u)
    assert [tuple(z.shape) for z in zs] == [(2, 4, 9, 7), (2, 8, 5, 4), (2, 8, 3, 2)]
    assert all(not z.any() for z in zs)


@pytest.mark.parametrize("backward", list_backwards())
def test_every_backward_mode_trains_every_stream(backward):
    opts = {"steps": 3} if backward == "unrolled" else {}
    model = tiny(
        3, deq={"backward": backward, "backward_opts": opts, "solver_opts": {"max_iter": 6}}
    )
    logits, stats = model(torch.randn(4, 1, 8, 8))
    logits.logsumexp(1).sum().backward()
    assert stats.mode == backward
    layer = model.backbone.layer
    for k, block in enumerate(layer.blocks):
        assert block.conv1.weight_v.grad.abs().sum() > 0, f"stream {k} block got no gradient"
    assert all(p.grad.abs().sum() > 0 for p in layer.fusion.post.parameters() if p.requires_grad)
    assert model.backbone.injection[0].weight.grad.abs().sum() > 0
    if backward == "implicit":
        assert stats.backward is not None


def classifier_grads(model, x, y):
    logits, stats = model(x)
    loss = nn.functional.cross_entropy(logits, y)
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True), stats


def test_implicit_gradient_matches_long_unroll():
    torch.manual_seed(0)
    tight = {"max_iter": 200, "tol": 1e-12}
    model = make_contractive(
        tiny(2, post_gn_affine=True, deq={"solver_opts": tight, "backward_opts": tight})
    ).double()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    y = torch.tensor([0, 1, 2])
    g_imp, stats = classifier_grads(model, x, y)
    assert stats.forward.converged.all() and stats.backward.converged.all()
    with deq_override(model, backward="unrolled", backward_opts={"steps": 150}):
        g_ref, _ = classifier_grads(model, x, y)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    scale = max(b.abs().max() for b in g_ref if b is not None)
    for name, a, b in zip(names, g_imp, g_ref):
        # biases right before a batch norm have zero gradient up to round-off, hence the atol
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9 * scale, msg=name)
    # the stem (through the injection), f's layers and the head all carry gradient
    for prefix in (
        "backbone.injection",
        "backbone.layer.blocks.1",
        "backbone.layer.fusion",
        "head",
    ):
        assert any(b.abs().sum() > 0 for n, b in zip(names, g_ref) if n.startswith(prefix))


def test_dropout_mask_is_fixed_within_a_forward_and_redrawn_between():
    torch.manual_seed(0)
    model = make_contractive(
        tiny(
            2, dropout=0.5, post_gn_affine=True, deq={"solver_opts": {"max_iter": 60, "tol": 1e-8}}
        )
    ).double()
    x = torch.randn(3, 1, 8, 8, dtype=torch.float64)
    (a, sa), (b, _) = model.backbone(x), model.backbone(x)
    # a mask redrawn at every solver step would leave no fixed point to converge to
    assert sa.forward.converged.all()
    assert not torch.allclose(a[0], b[0])
    model.eval()
    (c, _), (d, _) = model.backbone(x), model.backbone(x)
    assert torch.equal(c[0], d[0])


def test_weight_norm_covers_block_and_post_fusion_convs_and_follows_updates():
    model = tiny(2)
    layer = model.backbone.layer
    convs = [m for m in layer.blocks.modules() if isinstance(m, nn.Conv2d)]
    convs += [m for m in layer.fusion.post.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(has_weight_norm(c) for c in convs)
    assert "weight" not in dict(convs[0].named_parameters())
    plain = tiny(2, weight_norm=False).backbone.layer.blocks[0].conv1
    assert not has_weight_norm(plain)

    model.eval()
    x = torch.randn(2, 1, 8, 8)
    before, _ = model(x)
    with torch.no_grad():
        layer.blocks[0].conv1.weight_g.mul_(2.0)
        layer.blocks[0].conv2.weight_v.add_(0.5)
    after, _ = model(x)
    assert not torch.allclose(before, after)


def test_pickles_for_ddp_spawn():
    model = tiny(3, dropout=0.2).eval()
    x = torch.randn(2, 1, 8, 8)
    clone = pickle.loads(pickle.dumps(model))
    assert torch.equal(model(x)[0], clone(x)[0])
    assert model.state_dict().keys() == clone.state_dict().keys()


def test_override_reaches_the_backbone_solver():
    model = tiny(2)
    assert model.deq is model.backbone.deq
    with deq_override(model, backward="unrolled", backward_opts={"steps": 2}):
        _, stats = model(torch.randn(2, 1, 8, 8))
    assert stats.mode == "unrolled" and stats.forward.nstep.tolist() == [2, 2]
    _, stats = model(torch.randn(2, 1, 8, 8))
    assert stats.mode == "implicit"


def test_bad_sizes_are_explained():
    with pytest.raises(ValueError, match="divisible by groups"):
        tiny(2, channels=[6, 8], num_groups=4)
    with pytest.raises(ValueError, match="one entry per stream"):
        tiny(2, head_channels=[2])
    with pytest.raises(ValueError, match="at least one stream"):
        tiny(2, channels=[])


# ----------------------------------------------------------------------------------------------
# The layered twin
# ----------------------------------------------------------------------------------------------


def test_layered_twin_stacks_the_same_layer_with_its_own_weights():
    deq, layered = tiny(), tiny(depth=3)
    assert layered.deq is None and len(layered.backbone.layers) == 3
    shapes = {k: v.shape for k, v in deq.backbone.layer.state_dict().items()}
    for layer in layered.backbone.layers:
        assert type(layer) is type(deq.backbone.layer)
        assert {k: v.shape for k, v in layer.state_dict().items()} == shapes
    a, b = layered.backbone.layers[0], layered.backbone.layers[1]
    assert a.blocks[0].conv1.weight_v.data_ptr() != b.blocks[0].conv1.weight_v.data_ptr()
    # Stem and head are the DEQ's: the state dicts differ only in the layer part.
    head = lambda m: {k for k in m.state_dict() if ".layer" not in k}  # noqa: E731
    assert head(deq) == head(layered)


def test_layered_twin_applies_each_layer_once_and_trains_them_all():
    model = tiny(depth=2)
    x = torch.randn(3, 1, 8, 8)
    logits, stats = model(x)
    assert stats is None and logits.shape == (3, 3)
    logits.sum().backward()
    for layer in model.backbone.layers:
        assert layer.fusion.post[0][1].weight_v.grad.abs().sum() > 0
    # The first layer sees zero streams (as the DEQ's first step does): its first convs get no
    # gradient; every later layer's do.
    assert model.backbone.layers[1].blocks[0].conv1.weight_v.grad.abs().sum() > 0
    # Layer by layer by hand, from zero streams with the injection each time.
    model.eval()
    u = model.backbone.injection(x)
    zs = model.backbone.initial_state(u)
    for layer in model.backbone.layers:
        zs = layer(zs, u)
    torch.testing.assert_close(model.head(zs), model(x)[0])


def test_layered_twin_depth_is_validated():
    with pytest.raises(ValueError, match=r"model\.depth"):
        tiny(depth=-1)
