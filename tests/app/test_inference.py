"""``deq_lightning.load``: a tiny trained run of each family predicts outside any Trainer, as its
task computes in eval mode, and says when its DEQ is not at its fixed point."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import deq_lightning
from deq_lightning.app.inference import (
    Classifier,
    FlowEstimator,
    NotAtEquilibriumWarning,
    Segmenter,
    TextGenerator,
)
from deq_lightning.app.train import train
from deq_lightning.deq import deq_override

from ..helpers.app import FAST, compose_cfg
from .test_segmentation import save_run_config

# A few optimizer steps, no test stage: enough to have a checkpoint and a saved config.
SHORT = [*FAST, "trainer.max_steps=2", "trainer.limit_val_batches=1", "test=false"]
FAMILIES = {
    "classification": [],
    "segmentation": ["experiment=seg_tiny", "data.n_train=32", "data.n_val=4", "data.n_test=4"],
    "flow": ["experiment=flow_tiny", "data.train_size=16", "data.val_size=2", "data.test_size=2",
             "data.batch_size=2", "callbacks.flow_images=null"],
    "language": ["experiment=lm_tiny", "trainer.val_check_interval=2", "task.pretrain_steps=0",
                 "data.train_tokens=20000"],
}  # fmt: skip


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """A tiny run of a family, trained on first use and shared by the module's tests."""
    runs: dict[str, Path] = {}

    def run_dir(family: str) -> Path:
        if family not in runs:
            out = tmp_path_factory.mktemp(family) / "run"
            cfg = compose_cfg([*SHORT, *FAMILIES[family]], out)
            train(cfg)
            save_run_config(cfg, out)
            runs[family] = out
        return runs[family]

    return run_dir


@torch.no_grad()
def test_classification(trained):
    run_dir = trained("classification")
    model = deq_lightning.load(run_dir)
    assert isinstance(model, Classifier) and not model.task.training
    images = torch.randn(5, 1, 8, 8)  # the digits as the DataModule serves them: standardised
    labels = model.predict(images)
    assert labels.shape == (5,) and labels.dtype == torch.int64
    assert torch.equal(labels, model.predict(images))  # deterministic
    assert torch.equal(labels, model.task(images).argmax(-1))  # what the task computes
    probs = model.predict_proba(images)
    assert probs.shape == (5, 10) and torch.allclose(probs.sum(-1), torch.ones(5))
    assert model.predict(images[0]).shape == ()  # one image, one answer
    assert 0.0 <= model.converged <= 1.0 and model.last_stats
    with pytest.raises(ValueError, match=r"\(N, 1, H, W\).*got \(5, 3, 8, 8\)"):
        model.predict(torch.randn(5, 3, 8, 8))
    # A checkpoint file of the run loads the same model.
    by_ckpt = deq_lightning.load(run_dir / "checkpoints" / "last.ckpt")
    assert torch.equal(by_ckpt.predict(images), labels)


def test_not_a_run_names_the_path_and_what_a_run_holds(trained, tmp_path):
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}.*checkpoints/last\.ckpt"):
        deq_lightning.load(tmp_path)
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path / 'nope'} does not exist"):
        deq_lightning.load(tmp_path / "nope")
    stray = tmp_path / "weights.ckpt"  # a checkpoint outside its run directory
    shutil.copy(trained("classification") / "checkpoints" / "last.ckpt", stray)
    with pytest.raises(FileNotFoundError, match=r"\.hydra/config\.yaml not found"):
        deq_lightning.load(stray)


@torch.no_grad()
def test_a_solve_off_its_fixed_point_warns(trained):
    model = deq_lightning.load(trained("classification"))
    budget = {"max_iter": 1, "tol": 1e-12}
    warns = pytest.warns(NotAtEquilibriumWarning, match=r"0\.0% of the samples.*max_iter")
    with deq_override(model.task.model, eval_solver_opts=budget), warns:
        model.predict(torch.randn(4, 1, 8, 8))
    assert model.converged == 0.0


@torch.no_grad()
def test_segmentation(trained):
    model = deq_lightning.load(trained("segmentation"))
    assert isinstance(model, Segmenter)
    images = torch.randn(2, 3, 24, 40)
    masks = model.predict(images)
    assert masks.shape == (2, 24, 40) and masks.dtype == torch.int64  # the input's resolution
    assert torch.equal(masks, model.predict(images))
    assert torch.equal(masks, model.task(images).argmax(1))
    assert model.predict(images[1]).shape == (24, 40)
    assert model.converged is not None
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        model.predict(torch.randn(2, 1, 24, 40))


@torch.no_grad()
def test_flow(trained):
    model = deq_lightning.load(trained("flow"))
    assert isinstance(model, FlowEstimator)
    gen = torch.Generator().manual_seed(0)
    frame1 = torch.randint(0, 256, (2, 3, 66, 76), generator=gen).float()
    frame2 = torch.roll(frame1, 2, dims=-1)
    flow = model.predict(frame1, frame2)
    assert flow.shape == (2, 2, 66, 76) and flow.dtype == torch.float32
    assert torch.equal(flow, model.predict(frame1, frame2))
    assert torch.equal(flow, model.task(frame1, frame2))
    assert model.predict(frame1[0], frame2[0]).shape == (2, 66, 76)
    with pytest.raises(ValueError, match="one shape"):
        model.predict(frame1, frame2[..., :72])


def test_language_model(trained):
    model = deq_lightning.load(trained("language"))
    assert isinstance(model, TextGenerator)
    prompt = " ".join(model.vocab.words[5:8])
    text = model.predict(prompt, n_tokens=6, seed=1)
    assert isinstance(text, str) and len(text.split()) <= 6
    assert model.predict(prompt, n_tokens=6, seed=1) == text
    prompt_ids = model.vocab.encode(prompt, "prompt")
    ids, _ = model.task.generate(prompt_ids, 6, generator=torch.Generator().manual_seed(1))
    assert model.vocab.decode(ids) == text and torch.equal(
        ids, model.last_ids
    )  # what the task samples
    assert len(model.last_stats) == 6  # the prompt's solve and one per new token but the last
    with pytest.raises(ValueError, match="prompt"):
        model.predict("zzz_not_a_word")
