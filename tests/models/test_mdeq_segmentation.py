import copy
import pickle

import pytest
import torch

from deq_lightning.deq import DEQStats, deq_override
from deq_lightning.models.mdeq import MDEQSegmenter, SegmentationHead


def tiny(**overrides) -> MDEQSegmenter:
    kwargs = dict(
        in_channels=3,
        num_classes=5,
        channels=[4, 8],
        expansion=2,
        num_groups=2,
        dropout=0.0,
        downsample_times=1,
        bn_momentum=0.1,
        deq={"solver": "anderson", "solver_opts": {"max_iter": 6}},
    )
    kwargs.update(overrides)
    return MDEQSegmenter(**kwargs)


@pytest.mark.parametrize(
    "downsample_times, channels, size, expected",
    [
        (0, [4, 8], (12, 20), (12, 20)),
        (1, [4, 8], (12, 20), (6, 10)),
        (2, [4, 8, 8, 8], (33, 17), (9, 5)),  # odd sizes round up at each halving
    ],
)
def test_logits_at_the_first_stream_resolution(downsample_times, channels, size, expected):
    model = tiny(downsample_times=downsample_times, channels=channels)
    logits, stats = model(torch.randn(2, 3, *size))
    assert logits.shape == (2, 5, *expected)
    assert isinstance(stats, DEQStats) and stats.forward.nstep.shape == (2,)


def test_every_stream_reaches_the_logits():
    torch.manual_seed(0)
    head = SegmentationHead([4, 6, 8], num_classes=3, bn_momentum=0.1).eval()
    streams = [torch.randn(1, 4, 8, 8), torch.randn(1, 6, 4, 4), torch.randn(1, 8, 2, 2)]
    base = head(streams)
    assert base.shape == (1, 3, 8, 8)
    for i in range(3):
        changed = [s.clone() for s in streams]
        changed[i] += 1.0
        assert not torch.allclose(head(changed), base), f"stream {i} does not reach the logits"


def test_gradients_reach_stem_deq_layer_and_head():
    model = tiny()
    logits, _ = model(torch.randn(2, 3, 16, 16))
    logits.square().mean().backward()
    parts = {"backbone.injection", "backbone.layer", "head"}
    for part in parts:
        grads = [p.grad for n, p in model.named_parameters() if n.startswith(part)]
        assert grads and all(g is not None for g in grads), part
        assert sum(g.abs().sum() for g in grads) > 0, part


def test_the_equilibrium_comes_from_self_deq():
    # The task base switches to unrolled pre-training through deq_override: the model must obey.
    model = tiny()
    with deq_override(model, backward="unrolled", backward_opts={"steps": 3}):
        _, stats = model(torch.randn(2, 3, 8, 8))
    assert stats.mode == "unrolled" and stats.forward.nstep.max().item() <= 3
    _, stats = model(torch.randn(2, 3, 8, 8))
    assert stats.mode == "implicit"


def test_bad_arguments_fail_clearly():
    with pytest.raises(ValueError, match="final_conv_kernel must be 1 or 3"):
        tiny(final_conv_kernel=2)
    with pytest.raises(ValueError, match="num_classes must be >= 2"):
        tiny(num_classes=1)
    with pytest.raises(ValueError, match="divisible by groups"):
        tiny(channels=[3, 8])


def test_final_conv_kernel_3_keeps_the_size_and_copies_pickle():
    model = tiny(final_conv_kernel=3).eval()
    x = torch.randn(1, 3, 10, 10)
    clone = pickle.loads(pickle.dumps(model))  # ddp_spawn sends the model to each process
    twin = copy.deepcopy(model)
    with torch.no_grad():
        out = model(x)[0]
        assert out.shape == (1, 5, 5, 5)
        assert torch.allclose(clone(x)[0], out) and torch.allclose(twin(x)[0], out)
