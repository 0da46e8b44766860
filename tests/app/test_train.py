"""Real training runs through the real entry points (Lightning trainer, Hydra configs, W&B)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from omegaconf import open_dict

from deq_lightning.app.train import train

from ..helpers.app import EXPERIMENTS, FAST, ROOT, compose_cfg, run_script
from ..helpers.wandb_offline import config_and_history, wandb_group


def experiment_overrides(name: str, tmp_path: Path) -> list[str]:
    from ..helpers import datasets

    return datasets.overrides_for(name, tmp_path)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_runs_fast_dev_run(experiment, tmp_path):
    overrides = [
        f"experiment={experiment}",
        "debug=fdr",
        *FAST,
        *experiment_overrides(experiment, tmp_path),
    ]
    cfg = compose_cfg(overrides, tmp_path / "run")
    # The training step runs in DEQ mode (QUICK sets task.pretrain_steps=0) and, where the
    # experiment has a Jacobian term, draws it on that step.
    jac = cfg.task.get("jac_loss_weight", 0) > 0
    if jac:
        with open_dict(cfg):
            cfg.task.jac_loss_freq = 1.0
    metrics = train(cfg)
    assert any(k.startswith("test/") for k in metrics), metrics
    # per-class IoU is NaN for a class absent from a tiny test set; nothing else may be
    assert all(v == v for k, v in metrics.items() if "/iou_" not in k), metrics
    if "test/fwd_nstep" in metrics:  # a DEQ (not an explicit baseline)
        assert metrics["train/pretraining"] == 0.0 and "train/fwd_nstep" in metrics, metrics
        if cfg.task.backward.name == "implicit":
            assert "train/bwd_nstep" in metrics, metrics
        assert ("train/jac_loss" in metrics) == jac, metrics
    from hydra.utils import get_class

    from deq_lightning.tasks.base import DEQTask

    if issubclass(get_class(cfg.task._target_), DEQTask):  # the non-finite guard's count
        assert metrics["train/nonfinite_steps"] == 0.0, metrics


def test_digits_default_learns(tmp_path):
    # Two epochs (40 steps), DEQ mode after 10 unrolled pre-training steps.
    cfg = compose_cfg([*FAST, "trainer.max_epochs=2", "task.pretrain_steps=10"], tmp_path / "run")
    metrics = train(cfg)
    assert metrics["test/acc"] > 0.5  # chance is 0.1
    assert metrics["val/acc_best"] >= metrics["val/acc"] - 1e-6
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["test/acc"] == pytest.approx(metrics["test/acc"])
    # DEQ diagnostics are part of the metrics
    assert {"val/fwd_nstep", "val/fwd_rel_res", "test/fwd_nstep"} <= set(saved)
    # Checkpoints hold plain hyper-parameters only: torch's safe loader accepts them.
    ckpt = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["hyper_parameters"]["solver"]["name"] == "anderson"
    assert ckpt["global_step"] > 0


def test_seed_zero_is_honoured(tmp_path):
    def run(seed, name):
        cfg = compose_cfg(
            [
                *FAST,
                "debug=default",
                "trainer.max_epochs=1",
                f"seed={seed}",
                "trainer.limit_train_batches=3",
                "trainer.limit_val_batches=1",
                "trainer.limit_test_batches=1",
                "test=true",
                "task.pretrain_steps=1",
                "trainer.detect_anomaly=false",
            ],
            tmp_path / name,
        )
        return train(cfg)["test/loss"]

    first = run(0, "a")
    assert first == run(0, "b")
    assert first != run(1, "c")


def test_wandb_offline_run_holds_config_and_deq_metrics(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_cfg(
        [
            "logger=wandb",
            "trainer.enable_progress_bar=false",
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1",
            "trainer.max_epochs=2",
            "task.pretrain_steps=2",
            "trainer.log_every_n_steps=1",
        ],
        tmp_path / "run",
    )
    train(cfg)
    (run_file,) = (tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb")
    config, keys = config_and_history(run_file)
    assert config["solver"]["name"] == "anderson" and config["solver"]["max_iter"] == 20
    assert config["task"]["model"]["_target_"].endswith("MDEQClassifier")
    for key in (
        "train/fwd_nstep_step",
        "train/bwd_nstep_step",
        "val/fwd_nstep",
        "val/fwd_rel_res",
        "val/fwd_converged",
        "val/fwd_res_p90",
        "train/fwd_steps_step",
        "test/fwd_res_max",
        "test/acc",
        "convergence/_type",
    ):
        assert key in keys, sorted(keys)
    run_id = (tmp_path / "run" / "wandb_run_id.txt").read_text().strip()
    assert run_file.name == f"run-{run_id}.wandb"


def test_ddp_spawn_in_process(tmp_path):
    cfg = compose_cfg(
        [
            *FAST,
            "strategy=ddp_spawn",
            "trainer.devices=2",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=2",
            "trainer.limit_val_batches=1",
            "trainer.num_sanity_val_steps=0",
            "data.batch_size=32",
        ],
        tmp_path / "run",
    )
    metrics = train(cfg)
    assert 0.0 <= metrics["test/acc"] <= 1.0 and "val/fwd_nstep" in metrics


@pytest.mark.slow
def test_ddp_subprocess_writes_one_run_dir(tmp_path, run_env):
    proc = run_script(
        "train.py",
        [
            "strategy=ddp",
            "trainer.devices=2",
            "trainer.max_epochs=1",
            "logger=csv",
            "data.batch_size=32",
            "trainer.limit_train_batches=4",
        ],
        run_env,
        tmp_path,
    )
    runs = list((tmp_path / "logs" / "train" / "runs").iterdir())
    assert len(runs) == 1, runs
    run = runs[0]
    assert (run / ".hydra" / "config.yaml").exists()
    assert (run / "train.log").exists() and (run / "train_ddp_process_1.log").exists()
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0 <= metrics["test/acc"] <= 1
    assert "run directory" in proc.stdout
    # The same checkpoint evaluated by a single process gives the same test accuracy:
    # the metric was reduced over both ranks, not taken from one of them.
    assert_eval_reproduces(run, metrics, run_env, tmp_path)


def assert_eval_reproduces(run_dir: Path, metrics: dict, run_env: dict, tmp_path: Path) -> None:
    """eval.py on the run's checkpoint gives the test accuracy the training run wrote."""
    ev = run_script("eval.py", [f"run_dir={run_dir}"], run_env, tmp_path)
    (eval_run,) = (tmp_path / "logs" / "eval" / "runs").iterdir()
    again = json.loads((eval_run / "metrics.json").read_text())
    assert again["test/acc"] == pytest.approx(metrics["test/acc"], abs=1e-6), ev.stdout


@pytest.mark.slow
def test_multirun_basic_sweep(tmp_path, run_env):
    limits = [
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=3",
        "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1",
    ]
    args = ["-m", "seed=0,1", "logger=wandb", "trainer.enable_progress_bar=false", *limits]
    run_script("train.py", args, run_env, tmp_path)
    (sweep,) = (tmp_path / "logs" / "train" / "multiruns").iterdir()
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir() and p.name.isdigit())
    assert [p.name for p in jobs] == ["0", "1"]
    ids, groups = set(), set()
    for job in jobs:
        assert (job / "metrics.json").exists()
        (run_file,) = (job / "wandb").glob("offline-run-*/run-*.wandb")
        config, _ = config_and_history(run_file)
        ids.add(run_file.name)
        groups.add(wandb_group(run_file))
        assert config["seed"] == int(job.name)
    assert len(ids) == 2  # one W&B run per job ...
    assert groups == {sweep.name}  # ... grouped by sweep


@pytest.mark.slow
def test_optuna_sweep_two_trials(tmp_path, run_env):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="the optuna extra is optional")
    run_script(
        "train.py",
        [
            "hparams_search=digits_optuna",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.sampler.n_startup_trials=2",
            "debug=limit",
            "logger=csv",
            "test=false",
        ],
        run_env,
        tmp_path,
    )
    (sweep,) = (tmp_path / "logs" / "debug" / "multiruns").iterdir()
    assert (sweep / "optimization_results.yaml").exists()


@pytest.mark.slow
def test_kill_and_resume_then_eval_reproduces(tmp_path, run_env):
    run_dir = tmp_path / "logs" / "train" / "runs" / "kill"
    args = [
        f"hydra.run.dir={run_dir}",
        "logger=csv",
        "trainer.max_epochs=3",
        "trainer.limit_train_batches=30",
        "trainer.enable_progress_bar=false",
        "data.batch_size=16",
        "task.pretrain_steps=10",
        "+callbacks.model_checkpoint.every_n_train_steps=10",
    ]
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=tmp_path,
        env=run_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert last.exists(), proc.communicate()[0][-3000:]
    time.sleep(2)  # now somewhere mid-epoch
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=120)[0]
    step_at_kill = torch.load(last, weights_only=True)["global_step"]
    assert step_at_kill > 0, out[-2000:]
    assert not (run_dir / "metrics.json").exists()
    resumed = run_script("train.py", args, run_env, tmp_path)
    assert f"resuming from {last}" in resumed.stdout
    final = torch.load(last, weights_only=True)
    assert final["global_step"] > step_at_kill and final["global_step"] == 90
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert_eval_reproduces(run_dir, metrics, run_env, tmp_path)


@pytest.mark.slow
def test_eval_overrides_apply_on_top_of_the_run_config(tmp_path, run_env):
    run_dir = tmp_path / "run"
    run_script(
        "train.py",
        [
            f"hydra.run.dir={run_dir}",
            "logger=csv",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=3",
            "trainer.limit_val_batches=2",
            "task.pretrain_steps=0",
        ],
        run_env,
        tmp_path,
    )
    run_script(
        "eval.py",
        [f"ckpt_path={run_dir}/checkpoints/last.ckpt", "solver.eval_opts.max_iter=2"],
        run_env,
        tmp_path,
    )
    (eval_run,) = (tmp_path / "logs" / "eval" / "runs").iterdir()
    metrics = json.loads((eval_run / "metrics.json").read_text())
    assert metrics["test/fwd_nstep"] <= 2.0


def test_missing_dataset_names_the_layout(tmp_path):
    cfg = compose_cfg(
        [
            *FAST,
            "debug=fdr",
            "data=cifar10",
            f"data.data_dir={tmp_path}/nope",
            "model.num_classes=10",
        ],
        tmp_path / "run",
    )
    with pytest.raises(FileNotFoundError, match="cifar-10-batches-py"):
        train(cfg)


def test_unconfigured_wandb_falls_back_to_offline(monkeypatch, tmp_path):
    from deq_lightning.app.build import wandb_mode

    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    monkeypatch.setenv("HOME", str(tmp_path))
    assert wandb_mode() == "offline"
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode() == "online"
    assert os.environ["WANDB_API_KEY"]
