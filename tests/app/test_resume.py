"""Runs that are killed, stopped or preempted continue exactly, and keep one continuous record."""

from __future__ import annotations

import csv
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import open_dict
from torch.utils.data import RandomSampler

from deq_lightning.app.build import build
from deq_lightning.app.status import resume_path
from deq_lightning.app.train import train
from deq_lightning.callbacks.checkpoint import (
    AtomicCheckpointIO,
    LastCheckpoint,
    ResumableSampler,
)
from deq_lightning.callbacks.preemption import EXIT_RESUMABLE
from deq_lightning.loggers import truncate_csv, wandb_history_steps

from ..helpers.app import FAST, ROOT, compose_cfg, run_script
from ..helpers.wandb_offline import finished_records

# Tiny digits runs: 6 training batches per epoch, the DEQ after 4 pre-training steps, a CSV row
# per step written at once (the tests follow a run's progress through it).
TINY = [
    "trainer.limit_train_batches=6",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "task.pretrain_steps=4",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "+logger.csv.flush_logs_every_n_steps=1",
]


def own_service(run_env: dict) -> dict:
    """``run_env`` without a W&B service an earlier in-process test left in the environment: a
    killed child's run would stay open in that shared service, and the re-run could not resume
    it ("run ID is in use"). A real run starts its own service, which ends with it."""
    return {k: v for k, v in run_env.items() if k != "WANDB_SERVICE"}


def start(script: str, args: list[str], env: dict, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(ROOT / script), *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def steps_logged(run_dir: Path) -> int:
    """Training steps whose row is in the run's metrics.csv (0 when none yet)."""
    path = run_dir / "csv" / "version_0" / "metrics.csv"
    if not path.is_file():
        return 0
    with open(path, newline="") as f:
        steps = [int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss_step")]
    return max(steps) + 1 if steps else 0


def wait_until(condition, proc: subprocess.Popen, timeout: float = 300) -> None:
    """Poll ``condition()`` while ``proc`` runs; fail with its output if it ends first."""
    deadline = time.time() + timeout
    while not condition():
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise AssertionError(f"condition never met; output:\n{proc.communicate()[0][-4000:]}")
        time.sleep(0.05)


def csv_rows(run_dir: Path) -> list[dict]:
    with open(run_dir / "csv" / "version_0" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def ckpt_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["global_step"]


# ------------------------------------------------------------------------------ end to end


@pytest.mark.slow
def test_kill9_at_a_random_step_resumes_exactly_with_one_record(tmp_path, run_env):
    env = own_service(run_env)
    every, epochs = 3, 3
    args = [
        "logger=many",
        *TINY,
        f"trainer.max_epochs={epochs}",
        f"callbacks.last_checkpoint.every_n_train_steps={every}",
    ]
    total = epochs * 6
    kill_at = random.randint(2, total - 2)
    why = f"(killed once {kill_at} steps were logged)"
    uninterrupted = tmp_path / "a"
    run_script("train.py", [f"hydra.run.dir={uninterrupted}", *args], env, tmp_path)

    run = tmp_path / "b"
    proc = start("train.py", [f"hydra.run.dir={run}", *args], env, tmp_path)
    wait_until(lambda: steps_logged(run) >= kill_at, proc)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL and not (run / "metrics.json").exists(), why
    progress = steps_logged(run)
    last = run / "checkpoints" / "last.ckpt"
    saved = ckpt_step(last) if last.exists() else 0
    # (a kill between a save and that step's CSV row leaves the row one step behind)
    assert saved <= progress + 1 and progress - saved <= every, (progress, saved, why)

    resumed = run_script("train.py", [f"hydra.run.dir={run}", *args], env, tmp_path)
    if saved:
        assert f"resuming from {last}" in resumed.stdout, why

    # Same seed on CPU: the continued run ends where the uninterrupted one does.
    a = json.loads((uninterrupted / "metrics.json").read_text())
    b = json.loads((run / "metrics.json").read_text())
    shown = {k: v for k, v in a.items() if k.startswith(("val/", "test/"))}
    assert shown and {k: b[k] for k in shown} == shown, why
    wa = torch.load(uninterrupted / "checkpoints" / "last.ckpt", weights_only=True)
    wb = torch.load(last, weights_only=True)
    assert wb["global_step"] == total
    assert all(torch.equal(wa["state_dict"][k], wb["state_dict"][k]) for k in wa["state_dict"]), why

    # One CSV file, steps in order, each training step once.
    assert [p.name for p in (run / "csv").iterdir()] == ["version_0"]
    rows = csv_rows(run)
    steps = [int(r["step"]) for r in rows]
    assert steps == sorted(steps), why
    train_steps = [int(r["step"]) for r in rows if r.get("train/loss_step")]
    assert train_steps == list(range(total)), why
    # One TensorBoard directory whose events, read as TensorBoard reads them, do not repeat steps.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert [p.name for p in (run / "tensorboard").iterdir()] == ["version_0"]
    events = EventAccumulator(str(run / "tensorboard" / "version_0")).Reload()
    assert [e.step for e in events.Scalars("train/loss_step")] == list(range(total)), why
    # One W&B run id; each later offline piece continues W&B's step; the sync command is printed.
    run_id = (run / "wandb_run_id.txt").read_text().strip()
    pieces = sorted((run / "wandb").glob("offline-run-*"))
    assert pieces and all(p.name.endswith(run_id) for p in pieces)
    flat = [s for p in pieces for f in p.glob("run-*.wandb") for s in wandb_history_steps(f)]
    assert flat == sorted(flat) and len(set(flat)) == len(flat), why
    assert f"wandb sync --id {run_id} {run / 'wandb'}/offline-run-*-{run_id}" in resumed.stdout


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_signal_saves_at_a_batch_boundary_and_exits_resumable(signum, tmp_path, run_env):
    run = tmp_path / "run"
    args = [f"hydra.run.dir={run}", "logger=csv", *TINY, "trainer.max_epochs=3"]
    proc = start("train.py", args, run_env, tmp_path)
    wait_until(lambda: steps_logged(run) >= 3, proc)
    proc.send_signal(signum)
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == EXIT_RESUMABLE, out[-3000:]
    last = run / "checkpoints" / "last.ckpt"
    step = ckpt_step(last)
    assert 3 <= step < 18 and f"stopped by a signal at step {step}" in out, out[-3000:]
    assert not (run / "metrics.json").exists()
    assert json.loads((run / "run_status.json").read_text())["status"] == "stopped"
    # The run's log file holds the project's messages and Lightning's; the console shows the
    # project's lines once.
    log = (run / "train.log").read_text()
    assert "[deq_lightning.app][INFO] - run directory" in log
    assert "[pytorch_lightning." in log and "stopped by a signal" in log
    assert out.count("run directory:") == 1


@pytest.mark.slow
def test_submitit_preemption_requeues_and_resumes_without_user_action(tmp_path, run_env):
    """The submitit launcher's local executor runs the same code path as SLURM: its requeue
    signal (SIGUSR2) reaches the job, which stops at a batch boundary, writes last.ckpt and is
    requeued by submitit; the requeued job resumes from it and completes."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the slurm extra")
    sweep = tmp_path / "sweep"
    args = [
        "-m",
        "hydra/launcher=local",
        f"hydra.sweep.dir={sweep}",
        "seed=0",
        "logger=csv",
        *TINY,
        "trainer.max_epochs=2",
    ]
    proc = start("train.py", args, run_env, tmp_path)
    job = sweep / "0"
    wait_until(lambda: steps_logged(job) >= 3, proc)

    def job_processes() -> list[int]:
        pids = []
        for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
            try:
                argv = cmdline.read_bytes().split(b"\0")
            except OSError:
                continue
            if b"submitit.core._submit" in argv and str(sweep).encode() in b" ".join(argv):
                pids.append(int(cmdline.parent.name))
        return pids

    (pid,) = job_processes()
    os.kill(pid, signal.SIGUSR2)
    out = proc.communicate(timeout=400)[0]
    assert proc.returncode == 0, out[-3000:]
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*_log.out"))
    assert "submitit requeues the job" in logs and "Requeued job" in logs, logs[-3000:]
    assert f"resuming from {job / 'checkpoints' / 'last.ckpt'}" in logs
    assert ckpt_step(job / "checkpoints" / "last.ckpt") == 12
    assert json.loads((job / "run_status.json").read_text())["status"] == "completed"


class RankRecorder(pl.Callback):
    """Writes each rank's training diagnostics (per batch and the epoch value) to a JSON file."""

    def __init__(self, path: str) -> None:
        self.path, self.steps, self.epoch = Path(path), [], {}

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        m = trainer.callback_metrics
        self.steps.append({k: float(m[f"{k}_step"]) for k in KEYS})

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.epoch = {k: float(trainer.callback_metrics[f"{k}_epoch"]) for k in KEYS}
        out = self.path / f"rank{trainer.global_rank}.json"
        out.write_text(json.dumps({"steps": self.steps, "epoch": self.epoch}))


KEYS = ("train/fwd_abs_res", "train/bwd_abs_res")


@pytest.mark.slow
def test_ddp_spawn_reduces_training_diagnostics_and_keeps_wandb_in_the_run_dir(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # a stray ./wandb would land here
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    probe = tmp_path / "probe"
    probe.mkdir()
    cfg = compose_cfg(
        [
            "logger=wandb",
            "trainer.enable_progress_bar=false",
            "strategy=ddp_spawn",
            "trainer.devices=2",
            "trainer.max_epochs=1",
            "trainer.limit_train_batches=3",
            "trainer.limit_val_batches=1",
            "trainer.limit_test_batches=1",
            "trainer.num_sanity_val_steps=0",
            "task.pretrain_steps=0",
            "data.batch_size=32",
            "test=false",
            "+callbacks.probe._target_=tests.app.test_resume.RankRecorder",
            f"+callbacks.probe.path={probe}",
        ],
        tmp_path / "run",
    )
    train(cfg)
    ranks = [json.loads((probe / f"rank{r}.json").read_text()) for r in (0, 1)]
    for key in KEYS:
        per_rank = [sum(s[key] for s in r["steps"]) / len(r["steps"]) for r in ranks]
        assert abs(per_rank[0] - per_rank[1]) > 1e-6  # the ranks saw different data
        overall = sum(per_rank) / 2  # equal batches on both ranks
        for r in ranks:
            assert r["epoch"][key] == pytest.approx(overall, rel=1e-5), key
    assert not (tmp_path / "wandb").exists()
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/files"))


# ------------------------------------------------------------------------------ pieces


def test_atomic_checkpoint_write_leaves_the_previous_file_on_failure(tmp_path):
    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, path)
    with pytest.raises(Exception):  # noqa: B017 - pickling a lambda fails mid-write
        io.save_checkpoint({"global_step": 2, "bad": lambda: 0}, path)
    assert torch.load(path, weights_only=True) == {"global_step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]


def test_resumable_sampler_keeps_the_order_and_replays_an_interrupted_pass():
    torch.manual_seed(5)
    plain = list(RandomSampler(range(10)))
    after_plain = torch.get_rng_state()
    torch.manual_seed(5)
    sampler = ResumableSampler(RandomSampler(range(10)))
    first = list(sampler)
    # A fresh run sees the same order and the same draws from the global generator as before.
    assert first == plain and torch.equal(torch.get_rng_state(), after_plain)

    torch.manual_seed(123)  # the resumed process's global generator is elsewhere
    resumed = ResumableSampler(RandomSampler(range(10)))
    resumed.resume_state, resumed.skip = sampler.epoch_state, 4
    assert list(resumed) == first[4:]
    again = list(resumed)  # the next pass: a new order, nothing skipped
    assert sorted(again) == list(range(10)) and again != first


def test_metric_bests_survive_a_checkpoint(tmp_path):
    cfg = compose_cfg([*FAST], tmp_path / "run")
    task = instantiate(cfg.task, _recursive_=False)
    task.val_acc_best.update(torch.tensor(0.9))
    ckpt: dict = {}
    task.on_save_checkpoint(ckpt)
    resumed = instantiate(cfg.task, _recursive_=False)
    resumed.on_load_checkpoint(ckpt)
    resumed.on_train_start()  # what a resumed fit calls before training
    resumed.val_acc_best.update(torch.tensor(0.5))
    assert float(resumed.val_acc_best.compute()) == pytest.approx(0.9)

    lm_cfg = compose_cfg(["experiment=lm_tiny", *FAST], tmp_path / "lm")
    lm = instantiate(lm_cfg.task, _recursive_=False)
    lm.best_val_ppl = 3.5
    ckpt = {}
    lm.on_save_checkpoint(ckpt)
    torch.save(ckpt, tmp_path / "c.ckpt")  # what a checkpoint holds loads with weights_only
    lm_resumed = instantiate(lm_cfg.task, _recursive_=False)
    lm_resumed.on_load_checkpoint(torch.load(tmp_path / "c.ckpt", weights_only=True))
    assert lm_resumed.best_val_ppl == 3.5


def test_resume_path_takes_the_newest_checkpoint(tmp_path):
    cfg = compose_cfg([*FAST], tmp_path / "run")
    run = tmp_path / "run"
    assert resume_path(cfg, run) is None
    last, hpc = run / "checkpoints" / "last.ckpt", run / "hpc_ckpt_1.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"x")
    hpc.write_bytes(b"x")
    os.utime(last, (1, 1))
    assert resume_path(cfg, run) == str(hpc)  # a SLURM requeue after Lightning's hpc save
    os.utime(last, (time.time() + 10, time.time() + 10))
    assert resume_path(cfg, run) == str(last)
    with open_dict(cfg):
        cfg.resume = False
    assert resume_path(cfg, run) is None
    with open_dict(cfg):
        cfg.ckpt_path = "last"
    assert resume_path(cfg, run) == str(last)
    with open_dict(cfg):
        cfg.ckpt_path = str(hpc)
    assert resume_path(cfg, run) == str(hpc)


def test_failed_run_says_so(tmp_path):
    cfg = compose_cfg(
        [*FAST, "debug=fdr", "data=cifar10", f"data.data_dir={tmp_path}/nope"], tmp_path / "run"
    )
    with pytest.raises(FileNotFoundError):
        train(cfg)
    assert json.loads((tmp_path / "run" / "run_status.json").read_text())["status"] == "failed"


def test_truncate_csv_drops_rows_from_the_resume_step(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text("a,step\n" + "".join(f"{i / 10},{i}\n" for i in range(6)))
    truncate_csv(path, 3)
    with open(path, newline="") as f:
        assert [r["step"] for r in csv.DictReader(f)] == ["0", "1", "2"]


def test_wandb_history_reader_matches_the_test_reader(tmp_path, monkeypatch):
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    run = wandb.init(project="t", dir=str(tmp_path))
    for i in range(3):
        run.log({"x": i})
    run.log({"x": 9}, step=7)
    wandb.finish()
    (run_file,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    expected = [
        r.history.step.num
        for r in finished_records(run_file)
        if r.WhichOneof("record_type") == "history"
    ]
    assert expected == [0, 1, 2, 7] and wandb_history_steps(run_file) == expected


@pytest.mark.parametrize(
    ("interval", "saves"),
    [
        # 2 epochs x 4 batches; a step-triggered save on an epoch's last batch is left to the
        # epoch-end save. Steps 2 and 6, plus 2 epoch ends:
        (["callbacks.last_checkpoint.every_n_train_steps=2"], 4),
        # A time interval shorter than a step: after every step but the epochs' last, plus 2:
        (["callbacks.last_checkpoint.every_n_minutes=1e-9"], 8),
        # Neither: epoch ends only, whatever the monitored metric did.
        (["callbacks.last_checkpoint.every_n_minutes=null"], 2),
    ],
    ids=["steps", "minutes", "epochs"],
)
def test_last_checkpoint_intervals(interval, saves, tmp_path):
    cfg = compose_cfg(
        [
            *FAST,
            "trainer.max_epochs=2",
            "trainer.limit_train_batches=4",
            "trainer.limit_val_batches=1",
            "trainer.log_every_n_steps=1",
            "trainer.num_sanity_val_steps=0",
            "task.pretrain_steps=8",
            *interval,
        ],
        tmp_path / "run",
    )
    datamodule, task, trainer, _ = build(cfg, "train")
    trainer.fit(task, datamodule=datamodule)
    (callback,) = [c for c in trainer.callbacks if isinstance(c, LastCheckpoint)]
    assert callback.saves == saves
    assert isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO)
    assert ckpt_step(tmp_path / "run" / "checkpoints" / "last.ckpt") == 8
