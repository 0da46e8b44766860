"""``eval.py``: test a trained run's checkpoint with its own saved config (overrides allowed)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from deq_lightning.app.build import build
from deq_lightning.app.checks import check_accelerator, check_config
from deq_lightning.app.console import quiet_known_warnings, route_library_logs, say
from deq_lightning.app.results import finish, floats, report, write_metrics
from deq_lightning.app.runs import run_from


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test a checkpoint with its run's config; write ``metrics.json`` and log."""
    quiet_known_warnings()
    route_library_logs()
    run = run_from(cfg, "eval.py")
    run_cfg = run.config
    check_config(run_cfg)
    check_accelerator(run_cfg)
    output_dir = Path(run_cfg.paths.output_dir)
    say(f"evaluating {run.ckpt} with the config of {run.run_dir}")
    datamodule, task, trainer, loggers = build(run_cfg, "eval")
    try:
        trainer.test(task, datamodule=datamodule, ckpt_path=str(run.ckpt), weights_only=True)
        metrics = floats(trainer.callback_metrics)
        write_metrics(output_dir / "metrics.json", metrics)
        report(output_dir, metrics, loggers)
        return metrics
    finally:
        finish(loggers)
