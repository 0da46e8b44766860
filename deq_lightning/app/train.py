"""``train.py``: fit, test the best checkpoint, write ``metrics.json``; resumable."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException

from deq_lightning.app.build import build
from deq_lightning.app.checks import (
    apply_trainer_choice,
    check_accelerator,
    check_config,
    refuse_multirun_relaunch,
)
from deq_lightning.app.console import quiet_known_warnings, route_library_logs, say
from deq_lightning.app.results import finish, floats, report, write_metrics
from deq_lightning.app.status import (
    checkpoint_step,
    failure_hint,
    finished_run,
    resume_path,
    write_status,
)
from deq_lightning.app.sweeps import update_sweep_summary
from deq_lightning.callbacks.preemption import EXIT_RESUMABLE, PreemptionCheckpoint


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, then test the best checkpoint; write ``metrics.json``; return the final metrics.

    A run dir that holds a completed run (``run_status.json``) is not run again when
    ``skip_finished`` is on; otherwise a restart continues from its newest checkpoint. A stop by
    SIGTERM/SIGUSR1 exits with :data:`EXIT_RESUMABLE` once ``last.ckpt`` is written (or lets
    submitit requeue the job).
    """
    quiet_known_warnings()
    route_library_logs()
    apply_trainer_choice(cfg)
    check_config(cfg)
    check_accelerator(cfg)
    refuse_multirun_relaunch(cfg)
    output_dir = Path(cfg.paths.output_dir)
    say(f"run directory: {output_dir.resolve()}")
    done = finished_run(cfg, output_dir)
    if done is not None:
        return done
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    ckpt = resume_path(cfg, output_dir) if cfg.get("train", True) else None
    write_status(output_dir, "running")
    status, requeue, loggers, trainer = "failed", None, [], None
    try:
        datamodule, task, trainer, loggers = build(cfg, "train", checkpoint_step(ckpt))
        metrics = fit_and_test(cfg, datamodule, task, trainer, ckpt)
        write_metrics(output_dir / "metrics.json", metrics)
        report(output_dir, metrics, loggers)
        status = "completed"
        return metrics
    except SIGTERMException:
        status = "stopped"
        requeue = stopped_by_signal(trainer)
        raise SystemExit(EXIT_RESUMABLE) from None
    except Exception as e:
        hint = failure_hint(output_dir, trainer)
        if hint:
            say(f"failed: {type(e).__name__}: {e}")
            say(hint)
            e.add_note(hint)
        raise
    finally:
        finish(loggers)
        write_status(output_dir, status)
        update_sweep_summary(cfg)
        if requeue is not None:
            requeue()  # submitit: requeue this job and exit


def fit_and_test(
    cfg: DictConfig,
    datamodule: pl.LightningDataModule,
    task: pl.LightningModule,
    trainer: pl.Trainer,
    ckpt: str | None,
) -> dict[str, float]:
    """``trainer.fit`` (from ``ckpt`` when resuming) then ``trainer.test`` of the best weights,
    as ``cfg.train`` / ``cfg.test`` ask; the metrics of both."""
    if cfg.get("train", True):
        trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
    metrics = floats(trainer.callback_metrics)
    if cfg.get("test", True):
        best = best_checkpoint(trainer)
        if best is None:
            say("no best checkpoint (fast_dev_run or no validation): testing current weights")
        trainer.test(task, datamodule=datamodule, ckpt_path=best, weights_only=True)
        metrics.update(floats(trainer.callback_metrics))
    return metrics


def stopped_by_signal(trainer: pl.Trainer) -> Callable[[], None] | None:
    """Say where a run stopped by a signal stands; submitit's requeue, when it runs under it."""
    pre = next((c for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint)), None)
    requeue = pre.requeue if pre is not None else None
    saved = f"{pre.path} written; " if pre is not None and pre.saved else ""
    say(
        f"stopped by a signal at step {trainer.global_step}: {saved}"
        + ("submitit requeues the job" if requeue else "run the same command to continue")
        + f" (exit code {EXIT_RESUMABLE})"
    )
    return requeue


def best_checkpoint(trainer: pl.Trainer) -> str | None:
    """The best checkpoint of the run (ModelCheckpoint), else the last one; none in fast_dev_run."""
    if trainer.fast_dev_run:
        return None
    callbacks = trainer.checkpoint_callbacks
    for cb in callbacks:
        if isinstance(cb, ModelCheckpoint) and cb.best_model_path:
            return cb.best_model_path
    return next(
        (cb.last_model_path for cb in callbacks if getattr(cb, "last_model_path", "")), None
    )
