"""DEQ-TrellisNet and copy-memory through the real entry points (Hydra configs, Lightning)."""

import math

import hydra
import pytest
import torch

from deq_lightning.app.train import train

from ..helpers.app import FAST, compose_cfg


@pytest.mark.slow
def test_lm_trellis_tiny_trains_well_below_unigram_and_samples(tmp_path):
    overrides = [
        *FAST,
        "experiment=lm_trellis_tiny",
        "trainer.max_steps=300",
        "trainer.val_check_interval=150",
        "trainer.limit_val_batches=20",
        "trainer.limit_test_batches=20",
        "task.pretrain_steps=100",
        "task.scheduler.warmup=20",
        "data.train_tokens=200000",
    ]
    cfg = compose_cfg(overrides, tmp_path / "run")
    metrics = train(cfg)
    dm = hydra.utils.instantiate(cfg.data, _convert_="all")
    unigram = math.exp(dm.source.unigram_entropy)
    floor = metrics["test/ppl_floor"]
    # Well below what word frequencies alone give, and nothing beats the source's entropy rate.
    assert metrics["test/ppl"] < floor + 0.5 * (unigram - floor), (metrics["test/ppl"], unigram)
    assert metrics["test/ppl"] >= 0.95 * floor
    assert metrics["test/fwd_converged"] > 0.5  # evaluated at its equilibrium, not unrolled

    # Sampling carries the TrellisNet history token by token (the LM task's generate).
    from deq_lightning.tasks.language import LanguageModelTask

    ckpt = next((tmp_path / "run" / "checkpoints").glob("epoch_*.ckpt"))
    task = LanguageModelTask.load_from_checkpoint(ckpt, weights_only=True)
    prompt = dm.vocab.encode("<eos>", where="prompt")
    ids = task.generate(prompt, 12, 0.8, generator=torch.Generator().manual_seed(0)).ids
    assert ids.shape == (12,) and ((ids >= 0) & (ids < dm.vocab_size)).all()


@pytest.mark.slow
def test_copy_memory_tiny_learns_above_chance(tmp_path):
    cfg = compose_cfg(
        [
            *FAST,
            "experiment=copy_memory_tiny",
            "trainer.max_steps=150",
            "trainer.val_check_interval=75",
            "data.n_val=64",
            "data.n_test=128",
        ],
        tmp_path / "run",
    )
    metrics = train(cfg)
    chance = 1 / cfg.data.n_symbols
    assert metrics["test/recall_acc"] > 2 * chance, metrics
    assert metrics["test/loss"] < math.log(cfg.data.n_symbols)  # below guessing's NLL
    assert 0.0 <= metrics["test/recall_seq_acc"] <= metrics["test/recall_acc"]
