"""RAFT, DEQ-Flow's explicit twin: the same computation as torchvision's RAFT, outputs in DEQFlow's
format, padding, backpropagation through every iteration, warm start, frozen BN, errors, the
configs, and training through the flow task."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader
from torchvision.models.optical_flow import raft_large, raft_small
from torchvision.models.optical_flow.raft import RAFT, CorrBlock

from deq_lightning.config import build_model, plain
from deq_lightning.datamodules.flow import SyntheticFlowPairs, load_skimage_photos
from deq_lightning.models.deq_flow import DEQFlow, fixed_point_correction_loss
from deq_lightning.models.flow_layers import InputPadder
from deq_lightning.models.raft import CORR_DEFAULTS, RAFTFlow
from deq_lightning.tasks.flow import FlowTask

from ..helpers.app import compose_cfg

RAFT_TINY = {"_target_": "deq_lightning.models.raft.RAFTFlow", "size": "small", "corr_levels": 3}
SOLVER = {"name": "fixed_point", "max_iter": 2, "tol": 1e-3, "stop_mode": "rel"}
BACKWARD = {"name": "phantom", "steps": 1, "tau": 0.8}


def tiny(size: str = "small", **kwargs: object) -> RAFTFlow:
    return RAFTFlow(size, **{"num_iters": 3, "eval_iters": 4, "corr_levels": 3, **kwargs})


def frames(b: int = 2, h: int = 64, w: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(b, 3, h, w, generator=g) * 255, torch.rand(b, 3, h, w, generator=g) * 255


def count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------------------
# Outputs and the computation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size, hidden", [("small", 96), ("large", 128)])
def test_outputs_in_training_and_evaluation(size: str, hidden: int) -> None:
    model = tiny(size, n_states=5)  # n_states (DEQ-Flow's) is accepted and changes nothing
    img1, img2 = frames()
    out, stats = model(img1, img2)
    assert stats is None
    assert len(out["flow_preds"]) == 3 and out["flow"] is out["flow_preds"][-1]
    assert all(p.shape == (2, 2, 64, 64) for p in out["flow_preds"])
    assert out["flow_low"].shape == (2, 2, 8, 8)
    assert out["state"][0].shape == (2, hidden, 8, 8) and out["state"][1].shape == (2, 2, 8, 8)
    assert not out["state"][0].requires_grad and out["flow"].requires_grad
    model.eval()
    with torch.no_grad():
        out, _ = model(img1, img2)
    assert len(out["flow_preds"]) == 1 and out["flow"].shape == (2, 2, 64, 64)


@pytest.mark.parametrize("size", ["small", "large"])
def test_same_computation_as_torchvision_raft(size: str) -> None:
    """Driving the modules in our own loop gives what ``RAFT.forward`` gives with them: every
    iteration in training (batch-norm batch statistics), the last one of ``eval_iters`` in eval."""
    model = tiny(size)
    reference = RAFT(
        feature_encoder=model.feature_encoder,
        context_encoder=model.context_encoder,
        corr_block=CorrBlock(num_levels=3, radius=model.corr_radius),
        update_block=model.update_block,
        mask_predictor=model.mask_predictor,
    )
    img1, img2 = frames()
    x1, x2 = 2 * img1 / 255 - 1, 2 * img2 / 255 - 1
    with torch.no_grad():
        ours, _ = model(img1, img2)
        theirs = reference(x1, x2, num_flow_updates=3)
        assert len(ours["flow_preds"]) == len(theirs) == 3
        for a, b in zip(ours["flow_preds"], theirs):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
        model.eval()
        ours, _ = model(img1, img2)
        torch.testing.assert_close(ours["flow"], reference(x1, x2, 4)[-1], atol=1e-4, rtol=1e-4)


def test_torchvision_sizes_and_corr_defaults() -> None:
    """Each size is torchvision's builder (parameter counts of raft_small / raft_large, the
    paper's 1.0M / 5.3M), with its correlation pyramid as the default."""
    for size, builder, n in (("small", raft_small, 990_162), ("large", raft_large, 5_257_536)):
        reference = builder(weights=None)
        corr = reference.corr_block
        assert CORR_DEFAULTS[size] == (corr.num_levels, corr.radius)
        model = RAFTFlow(size)
        assert (model.corr_levels, model.corr_radius) == CORR_DEFAULTS[size]
        assert count(model) == count(reference) == n
        assert (model.mask_predictor is None) == (size == "small")
    # The pyramid override resizes the motion encoder's correlation input.
    small = RAFTFlow("small", corr_levels=3, corr_radius=2)
    assert small.update_block.motion_encoder.convcorr1[0].in_channels == 3 * 5**2


@pytest.mark.parametrize("mode", ["sintel", "kitti"])
def test_odd_sizes_are_padded_and_cropped_back(mode: str) -> None:
    model = tiny().eval()
    img1, img2 = frames(1, 70, 75)  # padded to 72 x 80
    padder = InputPadder(img1.shape, mode)
    with torch.no_grad():
        out, _ = model(img1, img2, pad_mode=mode)
        padded, _ = model(padder.pad(img1), padder.pad(img2))
    assert out["flow"].shape == (1, 2, 70, 75) and out["flow_low"].shape == (1, 2, 9, 10)
    # The same as running the replicate-padded frames and cropping the flow.
    torch.testing.assert_close(out["flow"], padder.unpad(padded["flow"]))
    torch.testing.assert_close(out["flow_low"], padded["flow_low"])


def test_gradient_reaches_every_iteration() -> None:
    """Backpropagation through all iterations: a loss on the last flow alone reaches the hidden
    state of the first iteration (through the GRU chain; the flow entering each iteration is
    detached, as in RAFT), and every module gets gradient."""
    model = tiny(num_iters=4)
    hiddens: list[torch.Tensor] = []

    def keep(_module: torch.nn.Module, _inputs: tuple, output: tuple) -> None:
        output[0].retain_grad()
        hiddens.append(output[0])

    model.update_block.register_forward_hook(keep)
    out, _ = model(*frames())
    out["flow"].square().mean().backward()
    assert len(hiddens) == 4
    for i, h in enumerate(hiddens):
        assert h.grad is not None and h.grad.abs().sum() > 0, f"iteration {i}"
    for name in ("feature_encoder", "context_encoder", "update_block"):
        grads = [p.grad for p in getattr(model, name).parameters()]
        assert all(g is not None and torch.isfinite(g).all() for g in grads), name
        assert any(g.abs().sum() > 0 for g in grads), name


def test_warm_start() -> None:
    model = tiny().eval()
    img1, img2 = frames(1)
    flow_init = torch.full((1, 2, 8, 8), 1.5)
    zero_flow = torch.zeros(1, 2, 8, 8)
    with torch.no_grad():
        cold, _ = model(img1, img2)
        zero, _ = model(img1, img2, flow_init=zero_flow)
        warm, _ = model(img1, img2, flow_init=flow_init)
        # the previous hidden state instead of the context encoder's, from zero flow
        resumed, _ = model(img1, img2, state_init=(cold["state"][0], zero_flow))
    torch.testing.assert_close(zero["flow"], cold["flow"])  # zero flow is the cold start
    assert not torch.allclose(warm["flow"], cold["flow"], atol=1e-3)
    assert not torch.allclose(resumed["flow"], cold["flow"], atol=1e-3)
    # With a zero flow head nothing is added: the flow stays where the warm start put it.
    with torch.no_grad():
        model.update_block.flow_head.conv2.weight.zero_()
        model.update_block.flow_head.conv2.bias.zero_()
        still, _ = model(img1, img2, flow_init=flow_init)
        from_state, _ = model(img1, img2, state_init=(cold["state"][0], flow_init))
    for out in (still, from_state):
        torch.testing.assert_close(out["flow_low"], flow_init)
        torch.testing.assert_close(out["flow"], torch.full((1, 2, 64, 64), 8 * 1.5))


def test_freeze_bn_survives_train_calls() -> None:
    model = tiny("large")  # small has no batch norm
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
    model(*frames())
    assert not all(torch.equal(m.running_mean, b) for m, b in zip(bns, before))


def test_mixed_precision_keeps_flow_and_state_in_float32() -> None:
    model = tiny("large")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = model(*frames(1))
    assert out["state"][0].dtype == torch.float32 and out["state"][1].dtype == torch.float32
    assert out["flow"].dtype == torch.float32 and torch.isfinite(out["flow"]).all()


def test_bad_arguments_and_inputs_are_explained() -> None:
    model = tiny().eval()
    with pytest.raises(ValueError, match="at least 64x64"):
        model(*frames(1, 48, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(torch.zeros(1, 1, 64, 64), torch.zeros(1, 1, 64, 64))
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        model(frames(1)[0], frames(2)[0])
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
    with pytest.raises(ValueError, match="state_init hidden has shape"):
        model(img1, img2, state_init=(torch.zeros(1, 32, 8, 8), torch.zeros(1, 2, 8, 8)))
    with pytest.raises(ValueError, match=r"\(hidden, flow\) pair"):
        model(img1, img2, state_init=(torch.zeros(1, 96, 8, 8),))
    with pytest.raises(ValueError, match="pad mode"):
        model(img1, img2, pad_mode="middle")
    for kwargs, match in (
        ({"size": "huge"}, "unknown RAFT size"),
        ({"num_iters": 0}, "num_iters must be >= 1"),
        ({"eval_iters": 0}, "eval_iters must be >= 1"),
        ({"corr_levels": 0}, "corr_levels must be >= 1"),
        ({"corr_radius": 0}, "corr_radius must be >= 1"),
        ({"pixel_max": 0}, "pixel_max must be > 0"),
        ({"n_states": 0}, "n_states must be >= 1"),
    ):
        with pytest.raises(ValueError, match=match):
            RAFTFlow(**kwargs)


# ----------------------------------------------------------------------------------------------
# Configs and the flow task
# ----------------------------------------------------------------------------------------------


def test_raft_tiny_composes_with_the_flow_tiny_experiment(tmp_path) -> None:
    """``experiment=flow_tiny model=raft_tiny``: the experiment's DEQ keys (model.n_states, the
    solver and backward groups) compose and are harmless; the model takes no ``deq``."""
    cfg = compose_cfg(["experiment=flow_tiny", "model=raft_tiny"], tmp_path / "run")
    assert cfg.task.model.n_states == 3  # written by the experiment for DEQ-Flow
    model = build_model(plain(cfg.task.model), plain(cfg.task.solver), plain(cfg.task.backward))
    assert isinstance(model, RAFTFlow) and (model.size, model.corr_levels) == ("small", 3)
    assert (model.num_iters, model.eval_iters) == (12, 24)
    # the counts quoted in conf/model/raft_tiny.yaml
    assert count(model) == 985_458 and count(DEQFlow("tiny", corr_levels=3)) == 766_816


def test_trains_through_the_flow_task(tmp_path) -> None:
    """A few optimizer steps on a fixed batch of synthetic pairs lower RAFT's sequence loss well
    below that of zero flow, and validation runs the task's metrics on its prediction."""
    photos = load_skimage_photos(["gravel"], 96)
    pairs = SyntheticFlowPairs(photos, 2, crop_size=64, max_objects=0, seed=1)
    samples = [pairs[0], pairs[1]]
    task = FlowTask(
        model={**RAFT_TINY, "num_iters": 3, "eval_iters": 3},
        solver=SOLVER,  # given, as the flow configs do; not passed to a model without `deq`
        backward=BACKWARD,
        optimizer={"_target_": "torch.optim.Adam", "lr": 5e-4},
    )
    assert isinstance(task.model, RAFTFlow)
    losses: list[float] = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            losses.append(float(outputs["loss"]))

    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=12,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        callbacks=[Record()],
        default_root_dir=tmp_path,
    )
    trainer.fit(task, DataLoader(samples * 12, batch_size=2), DataLoader(samples, batch_size=2))
    assert len(losses) == 12 and all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    flow, valid = (torch.stack([s[k] for s in samples]) for k in ("flow", "valid"))
    zero = fixed_point_correction_loss([torch.zeros_like(flow)] * 3, flow, valid).item()
    assert last < 0.6 * first and last < 0.6 * zero, (losses, zero)  # better than zero flow
    metrics = trainer.callback_metrics
    assert torch.isfinite(metrics["val/epe"]) and "val/epe_zero" in metrics


def test_benchmark_prediction_through_the_flow_task_warm_starts() -> None:
    """``FlowTask.predict_step`` (benchmark submissions): odd frame sizes, and the previous pair's
    final flow carried forward as ``flow_init`` within a sequence."""
    task = FlowTask(model={**RAFT_TINY, "eval_iters": 2}).eval()
    task._trainer = SimpleNamespace(testing=False, world_size=1)
    seen: list[bool] = []

    def spy(image1, image2, flow_init=None, **kwargs):
        seen.append(flow_init is not None)
        return task.model(image1, image2, flow_init=flow_init, **kwargs)

    task.run_model = spy
    pairs = torch.rand(3, 1, 3, 66, 70) * 255
    with torch.no_grad():
        for i, new_sequence in enumerate([True, False, False]):
            batch = {"image1": pairs[i], "image2": pairs[i].roll(1, -1), "name": [f"f{i}"]}
            out = task.predict_step({**batch, "new_sequence": torch.tensor([new_sequence])}, i)
            assert out["flow"].shape == (1, 2, 66, 70) and torch.isfinite(out["flow"]).all()
    assert seen == [False, True, True]
