"""Multiruns a user can trust: refused when they would hang, resumable, summarised, named."""

from __future__ import annotations

import csv
import json
import signal
from pathlib import Path

import pytest
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf, open_dict, read_write

from deq_lightning.app.checks import check_config, refuse_multirun_relaunch
from deq_lightning.app.sweeps import MakeSweepDir

from ..helpers.app import CONF, FAST, compose_cfg, run_script
from ..helpers.wandb_offline import records, wandb_group
from .test_resume import TINY, own_service, start, steps_logged, wait_until


def as_multirun(cfg, launcher: str = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"):
    """The composed config as a multirun job under ``launcher`` would see it."""
    with read_write(cfg.hydra), open_dict(cfg.hydra):
        cfg.hydra.mode = RunMode.MULTIRUN
        cfg.hydra.launcher._target_ = launcher
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.mark.parametrize(
    ("overrides", "refused"),
    [
        (["strategy=ddp", "trainer.devices=2"], True),
        (["strategy=fsdp", "trainer.devices=2"], True),
        (["strategy=ddp_spawn", "trainer.devices=2"], False),
        (["strategy=ddp_fork", "trainer.devices=2"], False),
        (["strategy=ddp", "trainer.devices=1"], False),  # one process: nothing is re-launched
        ([], False),
    ],
)
def test_multirun_refuses_strategies_that_relaunch(overrides, refused, tmp_path):
    cfg = as_multirun(compose_cfg([*FAST, *overrides], tmp_path / "run"))
    if refused:
        with pytest.raises(SystemExit, match=r"ddp_spawn.*hydra/launcher=slurm"):
            refuse_multirun_relaunch(cfg)
    else:
        refuse_multirun_relaunch(cfg)


def test_multirun_ddp_is_allowed_under_submitit(tmp_path):
    cfg = compose_cfg([*FAST, "strategy=ddp", "trainer.devices=2"], tmp_path / "run")
    launcher = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    refuse_multirun_relaunch(as_multirun(cfg, launcher))  # SLURM starts the ranks


def test_multirun_with_ddp_stops_at_once(tmp_path, run_env):
    proc = run_script(
        "train.py",
        ["-m", "seed=0,1", "strategy=ddp", "trainer.devices=2", "logger=csv"],
        run_env,
        tmp_path,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 1
    (line,) = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert "strategy=ddp" in line and "ddp_spawn" in line and "hydra/launcher=slurm" in line
    assert not list(tmp_path.rglob("*.ckpt"))


@pytest.mark.slow
def test_multirun_killed_half_way_resumes_to_completion(tmp_path, run_env):
    env = own_service(run_env)
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        f"hydra.sweep.dir={sweep}",
        "seed=0,1",
        "logger=many",
        *TINY,
        "trainer.max_epochs=2",
        "callbacks.last_checkpoint.every_n_train_steps=2",
    ]
    proc = start("train.py", args, env, tmp_path)
    wait_until(lambda: steps_logged(sweep / "1") >= 3, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    status = {j: json.loads((sweep / j / "run_status.json").read_text())["status"] for j in "01"}
    assert status == {"0": "completed", "1": "running"}
    assert (sweep / "1" / "checkpoints" / "last.ckpt").exists()
    assert not (sweep / "1" / "metrics.json").exists()
    first = (sweep / "0" / "metrics.json").stat().st_mtime_ns

    again = run_script("train.py", args, env, tmp_path)  # the same command
    assert "already completed" in again.stdout
    assert f"resuming from {sweep / '1' / 'checkpoints' / 'last.ckpt'}" in again.stdout
    assert (sweep / "0" / "metrics.json").stat().st_mtime_ns == first  # job 0 not re-run

    with open(sweep / "summary.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["job"], r["status"], r["overrides"]) for r in rows] == [
        ("0", "completed", "seed=0"),
        ("1", "completed", "seed=1"),
    ]
    for row in rows:
        saved = json.loads((Path(row["run_dir"]) / "metrics.json").read_text())
        assert float(row["test/acc"]) == pytest.approx(saved["test/acc"])
        assert float(row["val/acc_best"]) == pytest.approx(saved["val/acc_best"])
    table = (sweep / "summary.md").read_text().splitlines()
    assert len(table) == 4 and "| seed=1 |" in table[3]

    # W&B: each job's run is named from its swept overrides and grouped by the sweep.
    # (The piece of job 1 that was killed may hold nothing: its last piece is the one checked.)
    for job in "01":
        run_file = sorted((sweep / job / "wandb").glob("offline-run-*/run-*.wandb"))[-1]
        run = next(r.run for r in records(run_file) if r.WhichOneof("record_type") == "run")
        assert run.display_name == f"seed={job}" and wandb_group(run_file) == sweep.name


def test_optuna_study_is_kept_in_the_sweep_dir():
    """hydra-optuna-sweeper is an optional extra (not installed in CI): this checks the config
    only; ``test_optuna_sweep_two_trials`` runs it where the extra is installed."""
    conf = OmegaConf.to_container(OmegaConf.load(CONF / "hparams_search" / "digits_optuna.yaml"))
    assert conf["hydra"]["sweeper"]["storage"] == "sqlite:///${hydra.sweep.dir}/optuna.db"
    assert conf["hydra"]["sweeper"]["study_name"]
    # every invocation's trials in their own job dirs (the plugin numbers jobs from 0 again)
    assert conf["hydra"]["sweep"]["subdir"].startswith("${now:")


def test_sweep_dir_exists_before_the_sweeper_starts(tmp_path):
    sweep = tmp_path / "a" / "sweep"
    MakeSweepDir().on_multirun_start(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    assert sweep.is_dir()


def test_slurm_launcher_takes_nodes_and_tasks_from_the_trainer(tmp_path):
    """Multi-node DDP on SLURM: one task per device on each of trainer.num_nodes nodes."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the slurm extra")
    cfg = compose_cfg(
        [
            "hydra/launcher=slurm",
            "trainer=gpu",
            "strategy=ddp",
            "trainer.devices=4",
            "trainer.num_nodes=2",
            "data.batch_size=64",
        ],
        tmp_path / "run",
    )
    launcher = cfg.hydra.launcher
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert launcher.max_num_timeout > 0  # preempted / timed-out jobs are requeued
    check_config(cfg)  # 64 rows over 8 processes
    with open_dict(cfg):
        cfg.data.batch_size = 12
    with pytest.raises(ValueError, match="multiple of 8"):
        check_config(cfg)
