"""``model.recompute``: DEQ-Flow and RAFT run their encoders and update steps again in backward
instead of storing them. Same outputs, gradients and batch-norm statistics; fewer saved bytes."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import nn

from deq_lightning.models.deq_flow import DEQFlow, fixed_point_correction_loss
from deq_lightning.models.flow_layers import FlowModel
from deq_lightning.models.raft import RAFTFlow
from tests.deq.test_memory import saved_bytes

ALL = ["encoders", "update"]


def deq(backward: str, opts: dict) -> Callable[..., FlowModel]:
    solve = {"solver": "anderson", "solver_opts": {"max_iter": 6}}
    return lambda **kw: DEQFlow(
        "tiny",
        corr_levels=3,
        n_states=2,
        context_norm="batch",  # batch norm in the recomputed context encoder
        hidden_init="context",
        deq={**solve, "backward": backward, "backward_opts": opts},
        **kw,
    )


MODELS = {
    "deq_phantom": deq("phantom", {"steps": 2, "tau": 0.8}),
    "deq_implicit": deq("implicit", {"max_iter": 6}),
    "raft_small": lambda **kw: RAFTFlow("small", num_iters=3, corr_levels=3, **kw),
    "raft_large": lambda **kw: RAFTFlow("large", num_iters=3, corr_levels=3, **kw),
}


def frames() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    img1, img2 = (torch.rand(2, 3, 64, 64, generator=g) * 255 for _ in range(2))
    return img1, img2, torch.randn(2, 2, 64, 64, generator=g)


def twins(make: Callable[..., FlowModel], parts: list[str]) -> tuple[FlowModel, FlowModel]:
    torch.manual_seed(0)
    plain, recomputing = make(), make(recompute=parts)
    recomputing.load_state_dict(plain.state_dict())
    return plain.train(), recomputing.train()


def step(model: nn.Module) -> torch.Tensor:
    img1, img2, target = frames()
    out, _ = model(img1, img2)
    fixed_point_correction_loss(out["flow_preds"], target).backward()
    return out["flow"].detach()


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("parts", [["encoders"], ["update"], ALL])
def test_same_step_as_storing(name: str, parts: list[str]) -> None:
    plain, recomputing = twins(MODELS[name], parts)
    torch.testing.assert_close(step(recomputing), step(plain), rtol=1e-5, atol=1e-5)
    grads = dict(plain.named_parameters())
    for key, p in recomputing.named_parameters():
        assert p.grad is not None and grads[key].grad is not None, key
        torch.testing.assert_close(p.grad, grads[key].grad, rtol=1e-4, atol=1e-6, msg=key)
    # batch norm counted the batch once, not again in the recomputation
    buffers = dict(plain.named_buffers())
    assert any(k.endswith("num_batches_tracked") for k in buffers) == (name != "raft_small")
    for key, b in recomputing.named_buffers():
        torch.testing.assert_close(b, buffers[key], rtol=0, atol=0, msg=key)


@pytest.mark.parametrize("name", ["deq_phantom", "raft_large"])
def test_recomputing_stores_less(name: str) -> None:
    plain, recomputing = twins(MODELS[name], ALL)
    img1, img2, _ = frames()
    stored = saved_bytes(lambda: plain(img1, img2))
    assert saved_bytes(lambda: recomputing(img1, img2)) < 0.5 * stored


def test_evaluation_and_no_grad_run_as_usual() -> None:
    """Outside a training graph nothing is recomputed: evaluation output is unchanged."""
    plain, recomputing = twins(MODELS["deq_phantom"], ALL)
    img1, img2, _ = frames()
    with torch.no_grad():
        torch.testing.assert_close(
            recomputing.eval()(img1, img2).output["flow"], plain.eval()(img1, img2).output["flow"]
        )


def test_unknown_part_is_explained() -> None:
    with pytest.raises(ValueError, match=r"unknown recompute part\(s\) \['decoder'\].*encoders"):
        DEQFlow("tiny", corr_levels=3, recompute=["encoders", "decoder"])
    with pytest.raises(ValueError, match="unknown recompute part"):
        RAFTFlow("small", recompute="all")
