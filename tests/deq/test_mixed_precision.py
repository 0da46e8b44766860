"""Mixed precision is safe for every model family: f runs in bf16, the solver stays in float32.

Under CPU autocast (bf16) each family's tiny model must give a finite loss, reach the same
tolerance as in float32 with a float32 solver state, and give gradients close to float32's.
The same runs through Lightning with ``trainer.precision=bf16-mixed`` are in
``test_bf16_mixed_trainer_runs_each_family``.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deq_lightning.app.train import train
from deq_lightning.deq import DEQStats
from deq_lightning.models.deq_flow import fixed_point_correction_loss
from tests.helpers.app import FAST, compose_cfg
from tests.models.test_deq_flow import frames
from tests.models.test_deq_flow import tiny as flow_tiny
from tests.models.test_deq_transformer import tiny as lm_tiny
from tests.models.test_deq_transformer import tokens
from tests.models.test_mdeq import make_contractive
from tests.models.test_mdeq import tiny as mdeq_tiny
from tests.models.test_mdeq_segmentation import tiny as seg_tiny

# A bf16 f rounds its output to 8 significant bits, so ||f(z) - z|| / ||f(z)|| has a floor of
# about 1e-3 whatever the solver does: tolerances must sit above it (docs/speed.md).
SOLVE = {"max_iter": 100, "tol": 4e-3}
IMPLICIT = {"max_iter": 100, "tol": 4e-3}


def classification():
    model = make_contractive(
        mdeq_tiny(2, post_gn_affine=True, deq={"solver_opts": SOLVE, "backward_opts": IMPLICIT})
    )
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 2, 0])

    def loss():
        logits, stats = model(x)
        return F.cross_entropy(logits.float(), y), stats

    return model, loss


def language_model():
    model = lm_tiny(
        dropout=0.0, init_std=0.05, deq={"solver_opts": SOLVE, "backward_opts": IMPLICIT}
    )
    with torch.no_grad():  # the tests' contractive instance, in float32
        model.inject.weight.mul_(30)
        model.layer.attn.qkv.weight_g.mul_(0.1)
        model.layer.attn.out.weight_g.mul_(30)
    tok, tgt = tokens(2, 12), tokens(2, 12, seed=3)

    def loss():
        out, stats = model(tok, tgt)
        return out.nll.float().mean(), stats

    return model, loss


def segmentation():
    model = seg_tiny(deq={"solver_opts": SOLVE, "backward_opts": IMPLICIT})
    make_contractive(model)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 5, (2, 8, 8), generator=torch.Generator().manual_seed(2))

    def loss():
        logits, stats = model(x)
        return F.cross_entropy(logits.float(), y), stats

    return model, loss


def flow():
    model = flow_tiny(n_states=2)
    img1, img2 = frames(2)
    gt = torch.randn(2, 2, 64, 64, generator=torch.Generator().manual_seed(4))

    def loss():
        out, stats = model(img1, img2)
        return fixed_point_correction_loss(out["flow_preds"], gt), stats

    return model, loss


FAMILIES = {
    "mdeq_classification": classification,
    "deq_transformer_lm": language_model,
    "mdeq_segmentation": segmentation,
    "deq_flow": flow,
}


def step(model, loss_fn, bf16: bool) -> tuple[float, torch.Tensor, DEQStats]:
    model.zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss, stats = loss_fn()
    loss.backward()
    grads = [p.grad.flatten() for p in model.parameters() if p.grad is not None]
    return loss.item(), torch.cat(grads), stats


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bf16_autocast_matches_float32(family):
    torch.manual_seed(0)
    model, loss_fn = FAMILIES[family]()
    model.train()
    torch.manual_seed(1)
    loss32, g32, st32 = step(model, loss_fn, bf16=False)
    torch.manual_seed(1)
    loss16, g16, st16 = step(model, loss_fn, bf16=True)
    fwd32, fwd16 = st32.forward, st16.forward
    # The solver's records are float32 even though f ran in bf16.
    assert fwd16.abs_res.dtype == torch.float32 and fwd16.abs_trace.dtype == torch.float32
    assert torch.isfinite(torch.tensor(loss16)) and torch.isfinite(g16).all()
    if family == "deq_flow":  # tiny DEQ-Flow at init has no fixed point within reach
        assert (fwd16.residual <= 1.5 * fwd32.residual + 1e-3).all()
    else:  # converged to the same tolerance, forward and (implicit) backward
        assert fwd32.converged.all() and fwd16.converged.all(), fwd16.stop_reason
        assert (fwd16.residual < fwd16.tol).all()
        assert st16.backward is not None and st16.backward.converged.all()
        assert st16.backward.abs_res.dtype == torch.float32
    assert abs(loss16 - loss32) <= 0.02 * abs(loss32) + 1e-3
    cos = F.cosine_similarity(g16.double(), g32.double(), dim=0).item()
    rel = ((g16 - g32).norm() / g32.norm()).item()
    # bf16 keeps ~3 significant digits through f and its VJPs: on these tiny models the
    # gradient lands at cosine 0.988-0.9999 and relative error 0.02-0.16 of float32's.
    assert cos > 0.98 and rel < 0.2, (cos, rel)


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["cls_digits", "lm_tiny", "seg_tiny", "flow_tiny"])
def test_bf16_mixed_trainer_runs_each_family(experiment, tmp_path):
    from tests.helpers import datasets

    overrides = [
        f"experiment={experiment}",
        "debug=fdr",
        "trainer.precision=bf16-mixed",
        *FAST,
        *datasets.overrides_for(experiment, tmp_path),
    ]
    metrics = train(compose_cfg(overrides, tmp_path / "run"))
    assert metrics["train/nonfinite_steps"] == 0.0
    assert any(k.startswith("test/") for k in metrics), metrics
    for key in ("train/fwd_rel_res", "test/fwd_rel_res"):
        if key in metrics:
            assert metrics[key] == metrics[key] and metrics[key] < float("inf"), metrics
