"""Language-modelling task: perplexity arithmetic, its reduction over ranks, training, sampling."""

import json
import math
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from deq_lightning.app.train import train
from deq_lightning.metrics.language import TokenPerplexity

from ..helpers.app import FAST, compose_cfg, run_script


def test_perplexity_is_exp_of_mean_token_nll():
    metric = TokenPerplexity()
    metric.update(torch.tensor([[1.0, 2.0, 3.0]]))  # a batch of 3 tokens
    metric.update(torch.tensor([0.5]))  # a short last segment of 1 token
    expected = math.exp((1.0 + 2.0 + 3.0 + 0.5) / 4)  # not the mean of per-batch perplexities
    assert metric.compute().item() == pytest.approx(expected, rel=1e-6)
    assert expected != pytest.approx((math.exp(2.0) + math.exp(0.5)) / 2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_ppl(rank: int, world: int, port: int, nll: torch.Tensor, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    metric = TokenPerplexity()
    # Uneven shards: rank 0 gets 7 tokens, rank 1 gets 3.
    shard = nll[:7] if rank == 0 else nll[7:]
    metric.update(shard)
    out[rank] = metric.compute().item()
    dist.destroy_process_group()


def test_perplexity_identical_with_one_and_two_ranks():
    nll = torch.rand(10, generator=torch.Generator().manual_seed(0)) * 5
    single = TokenPerplexity()
    single.update(nll)
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank_ppl, args=(2, _free_port(), nll, out), nprocs=2, join=True)
        results = dict(out)
    assert results[0] == pytest.approx(single.compute().item(), rel=1e-6)
    assert results[1] == results[0]


def test_short_training_lowers_perplexity_towards_the_floor_and_samples(tmp_path):
    overrides = [
        *FAST,
        "experiment=lm_tiny",
        "trainer.max_steps=240",
        "trainer.val_check_interval=80",
        "trainer.limit_val_batches=20",
        "trainer.limit_test_batches=20",
        "task.pretrain_steps=120",
        "task.scheduler.warmup=20",
        "data.train_tokens=200000",
        "+callbacks.csv_history._target_=deq_lightning.callbacks.history.MetricHistory",
        f"+callbacks.csv_history.path={tmp_path / 'history.json'}",
    ]
    cfg = compose_cfg(overrides, tmp_path / "run")
    metrics = train(cfg)
    history = json.loads((tmp_path / "history.json").read_text())
    val = [h["val/ppl"] for h in history if "val/ppl" in h]
    assert len(val) >= 3
    floor = metrics["test/ppl_floor"]
    # The gap to the source's entropy rate more than halves within these few steps.
    assert val[-1] - floor < 0.6 * (val[0] - floor), (val, floor)
    assert metrics["test/ppl"] >= floor * 0.95  # nothing beats the source's entropy rate

    task_cls = __import__("deq_lightning.tasks.language", fromlist=["LanguageModelTask"])
    ckpt = next((tmp_path / "run" / "checkpoints").glob("epoch_*.ckpt"))
    task = task_cls.LanguageModelTask.load_from_checkpoint(ckpt, weights_only=True)
    dm = __import__("hydra").utils.instantiate(cfg.data, _convert_="all")
    prompt = dm.vocab.encode("<eos>", where="prompt")
    ids = task.generate(prompt, 12, 0.8, generator=torch.Generator().manual_seed(0)).ids
    assert ids.shape == (12,) and ((ids >= 0) & (ids < dm.vocab_size)).all()
    assert dm.vocab.decode(ids).split()  # real words of the corpus


@pytest.mark.slow
def test_generate_command(tmp_path, run_env):
    run_dir = tmp_path / "lm"
    run_script(
        "train.py",
        [
            f"hydra.run.dir={run_dir}",
            "experiment=lm_tiny",
            "logger=csv",
            "trainer.max_steps=20",
            "trainer.val_check_interval=10",
            "trainer.limit_val_batches=2",
            "trainer.limit_test_batches=2",
            "task.pretrain_steps=10",
            "data.train_tokens=20000",
        ],
        run_env,
        tmp_path,
    )
    proc = run_script(
        "generate.py", [f"run_dir={run_dir}", "prompt='<eos>'", "n_tokens=8"], run_env, tmp_path
    )
    assert "sample:" in proc.stdout
    (gen_run,) = (tmp_path / "logs" / "generate" / "runs").iterdir()
    out = json.loads((gen_run / "generated.json").read_text())
    assert len(out["tokens"]) == 8 and out["prompt"] == "<eos>"
