"""Hydra multiruns: W&B names of the jobs, the sweep dir, and the sweep's summary table."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import re
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.utilities import rank_zero_only

from deq_lightning.app.console import multirun, override_key
from deq_lightning.callbacks.checkpoint import write_atomic

STATUS_FILE = "run_status.json"
SUMMARY_METRIC = re.compile(r"^(val|test)/(acc|acc5|ppl|miou|epe)(_best)?$|^test/fwd_converged$")


class MakeSweepDir(Callback):
    """Hydra callback: create the sweep dir when a multirun starts, before the sweeper runs
    (Optuna opens its study in ``<sweep dir>/optuna.db`` before any job creates the dir)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        Path(config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)


def sweep_group() -> str | None:
    """In a multirun, jobs of one sweep share a W&B group named after the sweep directory."""
    return Path(HydraConfig.get().sweep.dir).name if multirun() else None


def swept_keys(hc: DictConfig) -> set[str]:
    """Keys the sweep varies: sweep overrides on the command line (``seed=0,1``, ``range()``,
    ``glob()``; read back from ``multirun.yaml``) and ``hydra.sweeper.params`` (Optuna)."""
    keys = set((hc.sweeper.get("params") or {}).keys())
    saved = Path(hc.sweep.dir) / "multirun.yaml"
    if saved.is_file():
        with contextlib.suppress(Exception):  # an unparsable file only loses the short name
            task = OmegaConf.load(saved).hydra.overrides.task
            parsed = OverridesParser.create().parse_overrides([str(o) for o in task])
            keys |= {o.key_or_group for o in parsed if o.is_sweep_override()}
    return keys


def swept_only(overrides: list[str], swept: set[str]) -> list[str]:
    """The overrides of swept keys (all of them when none is swept)."""
    return [o for o in overrides if override_key(o) in swept] or overrides


def sweep_job_name() -> str | None:
    """A multirun job's name from its overrides, swept keys only: ``solver=broyden,seed=1``."""
    if not multirun():
        return None
    hc = HydraConfig.get()
    return ",".join(swept_only([str(o) for o in hc.overrides.task], swept_keys(hc))) or None


@rank_zero_only
def update_sweep_summary(cfg: DictConfig) -> None:
    """``<sweep dir>/summary.csv`` and ``summary.md``: one row per job (overrides, status, final
    metrics, run dir), rebuilt from every job's status and metrics files when a job ends."""
    if not multirun():
        return
    sweep = Path(HydraConfig.get().sweep.dir)
    sweep.mkdir(parents=True, exist_ok=True)
    # Parallel jobs (submitit arrays) finish at the same time: one rebuild at a time.
    with open(sweep / ".summary.lock", "w") as lock:
        with contextlib.suppress(ImportError, OSError):
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        rows = summary_rows(sweep, cfg.get("optimized_metric"))
        write_summary(sweep, rows)


def summary_rows(sweep: Path, optimized: str | None) -> list[dict[str, Any]]:
    """One row per job dir of ``sweep`` that has a status file, in job order."""
    swept = swept_keys(HydraConfig.get())
    rows = []
    for status_file in sorted(sweep.glob(f"*/{STATUS_FILE}")):
        job = status_file.parent
        status = json.loads(status_file.read_text())
        metrics_file = job / "metrics.json"
        saved = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
        shown = {
            k: v
            for k, v in saved.items()
            if v is not None and (SUMMARY_METRIC.match(k) or k == optimized)
        }
        rows.append(
            {
                "job": job.name,  # the job's dir in the sweep dir (its number, for basic sweeps)
                "status": status["status"],
                "overrides": ",".join(swept_only(status.get("overrides", []), swept)),
                **shown,
                "run_dir": str(job.resolve()),
            }
        )
    rows.sort(key=lambda r: r["job"].zfill(12))  # 0, 1, ..., 10 (or the Optuna dirs' times)
    return rows


def write_summary(sweep: Path, rows: list[dict[str, Any]]) -> None:
    """``summary.csv`` and ``summary.md`` of ``rows``, metric columns sorted by name."""
    fixed = ("job", "status", "overrides", "run_dir")
    names = sorted({k for row in rows for k in row if k not in fixed})
    columns = ["job", "status", "overrides", *names, "run_dir"]
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    md = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    for row in rows:
        cells = [
            f"{row[c]:.4g}" if isinstance(row.get(c), float) else str(row.get(c, ""))
            for c in columns
        ]
        md.append("| " + " | ".join(cells) + " |")
    write_atomic(sweep / "summary.csv", lambda f: f.write(table.getvalue().encode()))
    write_atomic(sweep / "summary.md", lambda f: f.write(("\n".join(md) + "\n").encode()))
