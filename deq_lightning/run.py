"""What ``train.py`` and ``eval.py`` do, as plain functions of a composed config.

Kept out of the entry points so that tests (and notebooks) can call them directly.
"""

from __future__ import annotations

import contextlib
import csv
import inspect
import io
import json
import logging
import math
import netrc
import os
import re
import secrets
import string
import time
import warnings
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import Logger, TensorBoardLogger, WandbLogger
from pytorch_lightning.plugins.io import CheckpointIO
from pytorch_lightning.utilities import rank_zero_only
from pytorch_lightning.utilities.exceptions import SIGTERMException

from deq_lightning.callbacks.checkpoint import (
    LAST,
    AtomicCheckpointIO,
    LastCheckpoint,
    write_atomic,
)
from deq_lightning.callbacks.preemption import EXIT_RESUMABLE, PreemptionCheckpoint
from deq_lightning.deq import DEQ
from deq_lightning.loggers import CONSOLE_ECHO, continue_offline_wandb_step
from deq_lightning.tasks.base import deq_kwargs, plain

WANDB_ID_FILE = "wandb_run_id.txt"
STATUS_FILE = "run_status.json"
log = logging.getLogger(__name__)


def say(msg: str) -> None:
    """Console output of the run (rank 0 only): printed as ``[deq-lightning] msg``, and echoed to
    the run's log file through Python logging (Hydra's console handler skips the echo)."""
    if rank_zero_only.rank == 0:
        print(f"[deq-lightning] {msg}", flush=True)
        log.info(msg, extra={CONSOLE_ECHO: True})


def route_library_logs() -> None:
    """Send Lightning's Python-logging messages to the run's handlers (console and log file).

    At import, before Hydra configures logging, Lightning gives its loggers their own console
    handler and stops propagation, so none of its messages reached ``<run>/<job>.log``.
    """
    if not logging.getLogger().handlers:
        return  # logging not configured (a notebook, a bare script): leave Lightning's default
    for name in ("pytorch_lightning", "lightning_fabric"):
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            if type(handler) is logging.StreamHandler:
                logger.removeHandler(handler)
        logger.propagate = True


# ------------------------------------------------------------------------------ validation


def check_config(cfg: DictConfig) -> None:
    """Fail before any data is read when a value is impossible, naming the key."""
    task = cfg.task
    if "solver" in task and "backward" in task:
        kwargs = deq_kwargs(plain(task.solver), plain(task.backward))
        try:
            DEQ(**kwargs)
        except ValueError as e:
            raise ValueError(
                f"invalid solver/backward config (conf groups solver, backward): {user_keys(e)}"
            ) from None
    if cfg.get("data") is not None and "batch_size" in cfg.data:
        world = _world_size(cfg.trainer)
        bs = cfg.data.batch_size
        if world and (bs < 1 or bs % world):
            raise ValueError(
                f"data.batch_size={bs} is not divisible by the world size {world} "
                f"(trainer.devices x trainer.num_nodes); set data.batch_size to a multiple of {world}"
            )


# The DEQ's argument names -> the config keys a user types (backward_opts.tol -> backward.tol).
_USER_KEYS = (
    (re.compile(r"\beval_solver_opts[:.]\s*(\w+)"), r"solver.eval_opts.\1"),
    (re.compile(r"\bbackward_opts[:.]\s*(?:backward_opts[:.]\s*)?(\w+)"), r"backward.\1"),
    (re.compile(r"\bunknown backward_opts\b"), "unknown backward option(s)"),
    (re.compile(r"^(\w+) must be"), r"solver.\1 must be"),
)


def user_keys(error: Exception | str) -> str:
    """An error of the DEQ core, with its internal argument names replaced by config keys."""
    text = str(error)
    for pattern, key in _USER_KEYS:
        text = pattern.sub(key, text)
    return text


def apply_trainer_choice(cfg: DictConfig) -> None:
    """``trainer=cpu`` on an experiment written for several GPUs: one CPU process, unless the
    command line sets ``trainer.devices`` (an experiment's ``devices: 4`` means 4 GPUs, and as
    4 CPU processes it would silently run a multi-process CPU job)."""
    if not HydraConfig.initialized():
        return
    choice = HydraConfig.get().runtime.choices.get("trainer")
    typed = {o.split("=", 1)[0].lstrip("+~") for o in current_overrides()}
    devices = cfg.trainer.get("devices", 1)
    if choice == "cpu" and devices not in (1, "1", "auto") and "trainer.devices" not in typed:
        with open_dict(cfg):
            cfg.trainer.devices = 1
        say(
            f"trainer=cpu: devices=1 (the experiment's devices={devices} are GPUs); set "
            "trainer.devices=N for N CPU processes"
        )


def check_accelerator(cfg: DictConfig) -> None:
    """A GPU config on a machine without CUDA: say how to run it on the CPU (Lightning's own
    error, "No supported gpu backend found!", names no fix)."""
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator not in ("gpu", "cuda") or torch.cuda.is_available():
        return
    if accelerator == "gpu" and torch.backends.mps.is_available():
        return
    raise ValueError(
        f"this config runs on GPUs (trainer.accelerator={accelerator}, "
        f"trainer.devices={cfg.trainer.get('devices')}) but no CUDA device is visible; add "
        "trainer=cpu to the command to run it on the CPU"
    )


# Strategies whose ranks > 0 Lightning starts by re-running the command line (its subprocess
# launcher); inside a Hydra multirun that re-runs the whole sweep in every rank.
_RELAUNCHING = ("DDPStrategy", "FSDPStrategy", "DeepSpeedStrategy", "ModelParallelStrategy")


def refuse_multirun_relaunch(cfg: DictConfig) -> None:
    """``-m`` with ``strategy=ddp`` (or fsdp/deepspeed) would hang with orphan processes: stop at
    once, naming what works. Under the submitit launcher, SLURM creates the ranks: allowed."""
    if not HydraConfig.initialized() or str(HydraConfig.get().mode) != "RunMode.MULTIRUN":
        return
    if "submitit" in str(HydraConfig.get().launcher.get("_target_", "")):
        return
    strategy = cfg.trainer.get("strategy", "auto")
    choice = HydraConfig.get().runtime.choices.get("strategy")
    if isinstance(strategy, DictConfig):
        target = str(strategy.get("_target_", ""))
        start = strategy.get("start_method", "popen")
        relaunches = target.endswith(_RELAUNCHING) and start in (None, "popen")
        name = target.rsplit(".", 1)[-1]
    else:
        name = str(strategy)
        relaunches = name.startswith(("ddp", "fsdp", "deepspeed")) and not name.startswith(
            ("ddp_spawn", "ddp_fork", "ddp_notebook")
        )
    if relaunches and _world_size(cfg.trainer) != 1:
        raise SystemExit(
            f"error: a multirun (-m) cannot use strategy={choice or name} with several "
            "processes: Lightning re-runs the command in each rank, which re-runs the sweep and "
            "hangs. Use "
            "strategy=ddp_spawn (or ddp_fork) for local sweeps, or hydra/launcher=slurm "
            "(submitit: SLURM starts the ranks) on a cluster."
        )


def _world_size(trainer: DictConfig) -> int | None:
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1) or 1
    if isinstance(devices, int) and devices > 0:
        return devices * nodes
    if isinstance(devices, list | tuple):
        return len(devices) * nodes
    return None  # "auto" / -1: known only once the trainer exists (checked again in setup)


# ------------------------------------------------------------------------------ instantiation


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """A dict of ``_target_`` configs (callbacks, loggers) -> objects; entries set to null skip."""
    if not cfg:
        return []
    return [
        hydra.utils.instantiate(c, _convert_="all") for c in cfg.values() if c and "_target_" in c
    ]


def wandb_mode() -> str:
    """``online`` when an API key is configured, else ``offline`` (``WANDB_MODE`` wins)."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        host = "api.wandb.ai"
        if netrc.netrc().authenticators(host):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError):
        pass
    return "offline"


def instantiate_loggers(
    cfg: DictConfig, output_dir: Path, job_type: str, resume_step: int | None = None
) -> list[Logger]:
    """Loggers that keep one continuous record per run dir.

    W&B gets the run dir's persistent id (resume), ``WANDB_DIR`` = the run dir (so no process,
    spawned ranks included, writes to ``./wandb``), a sweep group and, in a multirun, a name made
    of the job's swept overrides. When the run continues from a checkpoint at ``resume_step``,
    CSV rows and TensorBoard events from that step on (written after the checkpoint by the
    interrupted process) are dropped, so the continued record has no duplicate steps.
    """
    loggers: list[Logger] = []
    for conf in (cfg.get("logger") or {}).values():
        if not conf or "_target_" not in conf:
            continue
        conf = OmegaConf.to_container(conf, resolve=True)
        cls = hydra.utils.get_class(conf["_target_"])
        if issubclass(cls, WandbLogger):
            conf.setdefault("job_type", job_type)
            conf["id"] = conf.get("id") or persistent_wandb_id(output_dir)
            conf.setdefault("resume", "allow")
            os.environ["WANDB_DIR"] = str(Path(conf.get("save_dir") or output_dir).resolve())
            mode = wandb_mode()
            if mode in ("offline", "dryrun"):
                conf["offline"] = True
            elif mode == "disabled":
                conf["mode"] = "disabled"
            group = sweep_group()
            if group and not conf.get("group"):
                conf["group"] = group
            name = sweep_job_name()
            if name and conf.get("name") in (None, cfg.get("task_name")):
                conf["name"] = name
        elif resume_step is not None and issubclass(cls, TensorBoardLogger):
            conf.setdefault("purge_step", resume_step)
        elif resume_step is not None and "resume_step" in _init_args(cls):
            conf.setdefault("resume_step", resume_step)
        loggers.append(hydra.utils.instantiate(conf))
    return loggers


def _init_args(cls: type) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters)


def persistent_wandb_id(output_dir: Path) -> str:
    """The run dir remembers its W&B id, so a restart continues the same W&B run."""
    path = output_dir / WANDB_ID_FILE
    if path.exists():
        return path.read_text().strip()
    run_id = "".join(secrets.choice(string.ascii_lowercase + string.digits) for _ in range(8))
    if rank_zero_only.rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(run_id)
    return run_id


def _multirun() -> bool:
    return HydraConfig.initialized() and str(HydraConfig.get().mode) == "RunMode.MULTIRUN"


def sweep_group() -> str | None:
    """In a multirun, jobs of one sweep share a W&B group named after the sweep directory."""
    return Path(HydraConfig.get().sweep.dir).name if _multirun() else None


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


class MakeSweepDir(Callback):
    """Hydra callback: create the sweep dir when a multirun starts, before the sweeper runs
    (Optuna opens its study in ``<sweep dir>/optuna.db`` before any job creates the dir)."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        Path(config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)


def sweep_job_name() -> str | None:
    """A multirun job's name from its overrides, swept keys only: ``solver=broyden,seed=1``."""
    if not _multirun():
        return None
    hc = HydraConfig.get()
    overrides = [str(o) for o in hc.overrides.task]
    swept = swept_keys(hc)
    chosen = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in swept]
    return ",".join(chosen or overrides) or None


def resume_path(cfg: DictConfig, output_dir: Path) -> str | None:
    """The checkpoint this run continues from.

    ``ckpt_path`` as given (``last``: this run dir's ``checkpoints/last.ckpt``); else, when
    ``resume`` is on, the newest of ``checkpoints/last.ckpt`` and Lightning's SLURM
    ``hpc_ckpt_<n>.ckpt`` in the run dir (a requeued job).
    """
    last = output_dir / "checkpoints" / LAST
    if cfg.get("ckpt_path"):
        return str(last) if cfg.ckpt_path == "last" and last.is_file() else cfg.ckpt_path
    if not cfg.get("resume", True):
        return None
    candidates = [p for p in [last, *output_dir.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
    if not candidates:
        return None
    newest = max(candidates, key=lambda p: p.stat().st_mtime)
    say(f"resuming from {newest}")
    return str(newest)


def checkpoint_step(path: str | None) -> int | None:
    """The global step a checkpoint file was written at (memory-mapped: nothing else is read)."""
    if not path or not Path(path).is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return int(state.get("global_step", 0))


# ------------------------------------------------------------------------------ train / eval


def build(
    cfg: DictConfig, job_type: str, resume_step: int | None = None
) -> tuple[pl.LightningDataModule, pl.LightningModule, pl.Trainer, list[Logger]]:
    output_dir = Path(cfg.paths.output_dir)
    datamodule = instantiate_own_errors(cfg.data, _convert_="all")
    reconcile_num_classes(cfg, datamodule)
    task = instantiate_own_errors(cfg.task, _recursive_=False)
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg, output_dir, job_type, resume_step)
    # Drop callbacks the trainer would refuse: a progress bar when bars are off, and
    # LearningRateMonitor without a logger.
    if cfg.trainer.get("enable_progress_bar") is False:
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.ProgressBar)]
    if not loggers:
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.LearningRateMonitor)]
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        plugins=checkpoint_plugins(cfg.trainer),
        _convert_="all",
    )
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
        if isinstance(logger, WandbLogger) and resume_step is not None:
            continue_offline_wandb_step(logger, resume_step)
    return datamodule, task, trainer, loggers


def instantiate_own_errors(node: DictConfig, **kwargs: Any) -> Any:
    """``hydra.utils.instantiate``, re-raising the constructor's own error: Hydra wraps it with
    its ``repr``, which prints a multi-line message (a dataset layout) as one line of ``\\n``."""
    try:
        return hydra.utils.instantiate(node, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, Exception):
            raise e.__cause__ from None
        raise


def reconcile_num_classes(cfg: DictConfig, datamodule: Any) -> None:
    """``model.num_classes`` from the data where the data knows it (ImageNet counts its class
    folders): ``null`` takes the data's number, a different number is an error naming both."""
    known = getattr(datamodule, "num_classes", None)
    model = cfg.get("model")
    if not isinstance(known, int) or model is None or "num_classes" not in model:
        return
    wanted = model.num_classes
    if wanted is None:
        with open_dict(cfg):
            cfg.model.num_classes = known
        say(f"model.num_classes={known}, from the data ({type(datamodule).__name__})")
        return
    if int(wanted) != known:
        raise ValueError(
            f"model.num_classes={wanted} but the data has {known} classes "
            f"({type(datamodule).__name__}"
            + (f", data.data_dir={cfg.data.data_dir}" if "data_dir" in cfg.data else "")
            + f"); set model.num_classes={known}, or model.num_classes=null to take it from "
            "the data, or point data.data_dir at the full dataset"
        )


def checkpoint_plugins(trainer: DictConfig) -> list[Any] | None:
    """``trainer.plugins`` plus :class:`AtomicCheckpointIO`, unless a CheckpointIO is configured
    or the strategy writes its own (sharded DeepSpeed) checkpoints."""
    plugins = hydra.utils.instantiate(trainer.get("plugins"), _convert_="all") or []
    plugins = list(plugins) if isinstance(plugins, list | tuple) else [plugins]
    strategy = trainer.get("strategy", "auto")
    target = (
        str(strategy.get("_target_", "")) if isinstance(strategy, DictConfig) else str(strategy)
    )
    if "deepspeed" not in target.lower() and not any(isinstance(p, CheckpointIO) for p in plugins):
        plugins.append(AtomicCheckpointIO())
    return plugins or None


def quiet_known_warnings() -> None:
    """Silence Lightning warnings that our design triggers on purpose."""
    # Ordered LM batches are an IterableDataset with __len__ so no sampler can reorder them.
    warnings.filterwarnings("ignore", message=r".*IterableDataset.*__len__.*")
    # LastCheckpoint puts a mid-epoch resume at the right batch (it says so when it cannot).
    warnings.filterwarnings("ignore", message=r".*resuming from a checkpoint that ended before.*")


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
    status, metrics, requeue, loggers = "failed", {}, None, []
    try:
        datamodule, task, trainer, loggers = build(cfg, "train", checkpoint_step(ckpt))
        if cfg.get("train", True):
            trainer.fit(task, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
        metrics = floats(trainer.callback_metrics)
        if cfg.get("test", True):
            best = best_checkpoint(trainer)
            if best is None:
                say("no best checkpoint (fast_dev_run or no validation): testing current weights")
            trainer.test(task, datamodule=datamodule, ckpt_path=best, weights_only=True)
            metrics.update(floats(trainer.callback_metrics))
        write_metrics(output_dir / "metrics.json", metrics)
        report(output_dir, metrics, loggers)
        status = "completed"
        return metrics
    except SIGTERMException:
        status = "stopped"
        pre = next((c for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint)), None)
        requeue = pre.requeue if pre is not None else None
        saved = f"{pre.path} written; " if pre is not None and pre.saved else ""
        say(
            f"stopped by a signal at step {trainer.global_step}: {saved}"
            + ("submitit requeues the job" if requeue else "run the same command to continue")
            + f" (exit code {EXIT_RESUMABLE})"
        )
        raise SystemExit(EXIT_RESUMABLE) from None
    except Exception as e:
        hint = failure_hint(output_dir, locals().get("trainer"))
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


def failure_hint(output_dir: Path, trainer: pl.Trainer | None) -> str | None:
    """What a failed run left behind and the command that continues it (``None``: nothing to
    continue, e.g. the data failed before training started)."""
    callbacks = trainer.callbacks if trainer is not None else []
    last = next((c for c in callbacks if isinstance(c, LastCheckpoint)), None)
    note = last.failure_note if last is not None else ""
    ckpt = output_dir / "checkpoints" / LAST
    if not ckpt.is_file():
        return f"{note}; nothing to resume from" if note else None
    if not note:
        note = f"the newest checkpoint is {ckpt}"
    command = " ".join(
        ["python train.py", *current_overrides(), f"hydra.run.dir={output_dir.resolve()}"]
    )
    return f"{note}. After fixing the cause, continue the run with: {command}"


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


# ------------------------------------------------------------------------------ run status, sweeps


def current_overrides() -> list[str]:
    return [str(o) for o in HydraConfig.get().overrides.task] if HydraConfig.initialized() else []


def read_status(output_dir: Path) -> dict[str, Any] | None:
    path = output_dir / STATUS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


@rank_zero_only
def write_status(output_dir: Path, status: str) -> None:
    """``run_status.json``: running / completed / stopped (a signal; resumable) / failed."""
    old = read_status(output_dir) or {}
    now = time.strftime("%Y-%m-%dT%H:%M:%S")
    record = {
        "status": status,
        "overrides": current_overrides(),
        "started": old.get("started", now) if status != "running" else now,
        "updated": now,
    }
    text = json.dumps(record, indent=1) + "\n"
    write_atomic(output_dir / STATUS_FILE, lambda f: f.write(text.encode()))


def finished_run(cfg: DictConfig, output_dir: Path) -> dict[str, float] | None:
    """The saved metrics of a completed run in ``output_dir`` with the same overrides, when
    ``skip_finished`` is on; ``None``: run it."""
    status = read_status(output_dir)
    if not status or status.get("status") != "completed" or not cfg.get("skip_finished", True):
        return None
    if status.get("overrides") != current_overrides():
        say(
            f"{output_dir} holds a completed run with other overrides "
            f"({' '.join(status.get('overrides', []))}): continuing it with these"
        )
        return None
    metrics_file = output_dir / "metrics.json"
    saved = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    say(f"already completed ({STATUS_FILE}): not run again (skip_finished=false re-runs it)")
    update_sweep_summary(cfg)
    return {k: (math.nan if v is None else float(v)) for k, v in saved.items()}


SUMMARY_METRIC = re.compile(r"^(val|test)/(acc|acc5|ppl|miou|epe)(_best)?$|^test/fwd_converged$")


@rank_zero_only
def update_sweep_summary(cfg: DictConfig) -> None:
    """``<sweep dir>/summary.csv`` and ``summary.md``: one row per job (overrides, status, final
    metrics, run dir), rebuilt from every job's status and metrics files when a job ends."""
    if not _multirun():
        return
    sweep = Path(HydraConfig.get().sweep.dir)
    sweep.mkdir(parents=True, exist_ok=True)
    # Parallel jobs (submitit arrays) finish at the same time: one rebuild at a time.
    with open(sweep / ".summary.lock", "w") as lock:
        with contextlib.suppress(ImportError, OSError):
            import fcntl

            fcntl.flock(lock, fcntl.LOCK_EX)
        _write_sweep_summary(sweep, cfg.get("optimized_metric"))


def _write_sweep_summary(sweep: Path, optimized: str | None) -> None:
    hc = HydraConfig.get()
    swept = swept_keys(hc)
    rows, names = [], []
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
        names += [k for k in shown if k not in names]
        overrides = status.get("overrides", [])
        short = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in swept] or overrides
        rows.append(
            {
                "job": job.name,  # the job's dir in the sweep dir (its number, for basic sweeps)
                "status": status["status"],
                "overrides": ",".join(short),
                **shown,
                "run_dir": str(job.resolve()),
            }
        )
    rows.sort(key=lambda r: r["job"].zfill(12))  # 0, 1, ..., 10 (or the Optuna dirs' times)
    columns = ["job", "status", "overrides", *sorted(names), "run_dir"]
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


def floats(metrics: dict[str, Any]) -> dict[str, float]:
    """Scalar metrics as floats; Lightning's ``_step``/``_epoch`` twins folded into one key."""
    out = {}
    for k, v in metrics.items():
        v = v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 else v
        if k.endswith("_step") or not isinstance(v, int | float) or isinstance(v, bool):
            continue
        out[k.removesuffix("_epoch")] = float(v)
    return dict(sorted(out.items()))


@rank_zero_only
def write_metrics(path: Path, metrics: dict[str, float]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    clean = {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}
    write_atomic(path, lambda f: f.write((json.dumps(clean, indent=2) + "\n").encode()))


@rank_zero_only
def report(output_dir: Path, metrics: dict[str, float], loggers: list[Logger]) -> None:
    shown = {k: v for k, v in metrics.items() if k.startswith(("test/", "val/"))}
    say("final metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in shown.items()))
    headline = headline_metrics(metrics)
    if headline:
        say(headline)
    say(f"metrics written to {output_dir.resolve() / 'metrics.json'}")
    for logger in loggers:
        if isinstance(logger, WandbLogger):
            hint = wandb_sync_hint(logger)
            if hint:
                say(hint)


def wandb_sync_hint(logger: WandbLogger) -> str | None:
    """How to upload an offline run: every piece of it (one per process that resumed the run),
    in order, into the one W&B run. ``None`` when W&B ran online or disabled."""
    run = logger.experiment
    if run is None or not getattr(run, "offline", False) or getattr(run, "disabled", False):
        return None
    wandb_dir = Path(run.dir).parent.parent
    return (
        f"W&B ran offline; upload later with: wandb sync --id {run.id} "
        f"{wandb_dir}/offline-run-*-{run.id}"
    )


TASK_METRICS = ("acc", "ppl", "miou", "epe")


def headline_metrics(metrics: dict[str, float]) -> str | None:
    """``test: acc=0.981, 96.3% of samples at their fixed point``: the result and whether it
    came from an equilibrium, side by side (the last stage that has them)."""
    for stage in ("test", "val"):
        result = [
            f"{m}={metrics[f'{stage}/{m}']:.4g}" for m in TASK_METRICS if f"{stage}/{m}" in metrics
        ]
        converged = metrics.get(f"{stage}/fwd_converged")
        if not result:
            continue
        if converged is None:
            return f"{stage}: {', '.join(result)} (no equilibrium solve: an explicit model)"
        return (
            f"{stage}: {', '.join(result)}, {converged:.1%} of samples at their fixed point "
            f"({stage}/fwd_converged)"
        )
    return None


def finish(loggers: list[Logger]) -> None:
    """Close W&B and process groups so the next multirun job starts clean."""
    if any(isinstance(lg, WandbLogger) for lg in loggers):
        import wandb

        wandb.finish()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    # Lightning's DDP leaves these behind; the next multirun job must not inherit them.
    for var in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"):
        os.environ.pop(var, None)


def metric_value(metrics: dict[str, float], name: str | None) -> float | None:
    """The value a sweeper optimises; a clear error when it was never logged."""
    if not name:
        return None
    if name not in metrics:
        raise KeyError(
            f"optimized_metric '{name}' was not logged; available: {', '.join(sorted(metrics))}"
        )
    return metrics[name]


# ------------------------------------------------------------------------------ eval

# Config groups whose option lands somewhere other than a node of the same name.
GROUP_NODES = {"strategy": "trainer.strategy"}
EVAL_OWN_KEYS = {"run_dir", "ckpt_path"}


def locate_run(cfg: DictConfig) -> tuple[Path, Path]:
    """``(run_dir, checkpoint)`` from ``run_dir=`` and/or ``ckpt_path=``."""
    if cfg.get("ckpt_path"):
        ckpt = Path(cfg.ckpt_path)
        if not ckpt.is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt} does not exist")
        run_dir = Path(cfg.run_dir) if cfg.get("run_dir") else ckpt.resolve().parent.parent
        return run_dir, ckpt
    if not cfg.get("run_dir"):
        raise ValueError("eval.py needs run_dir=<training run dir> or ckpt_path=<checkpoint>")
    run_dir = Path(cfg.run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    if not last.is_file():
        raise FileNotFoundError(
            f"no checkpoints/last.ckpt in run_dir={run_dir}; pass ckpt_path=<file> instead"
        )
    return run_dir, Path(best_from_last(last))


def best_from_last(last: Path) -> str:
    """The best checkpoint the training run tested (recorded in last.ckpt's callback state)."""
    state = torch.load(last, map_location="cpu", weights_only=True)
    for key, cb in state.get("callbacks", {}).items():
        if key.startswith("ModelCheckpoint") and cb.get("best_model_path"):
            best = Path(cb["best_model_path"])
            local = last.parent / best.name  # the run dir may have moved
            return str(best if best.is_file() else local if local.is_file() else last)
    return str(last)


def merge_overrides(
    saved: DictConfig, composed: DictConfig, skip: set[str] = frozenset()
) -> DictConfig:
    """The run's saved config with each key the user overrode taken from ``composed``."""
    hc = HydraConfig.get()
    for override in hc.overrides.task:
        key = override.split("=", 1)[0].lstrip("+~")
        if key in EVAL_OWN_KEYS or key in skip or key.startswith("hydra"):
            continue
        node = GROUP_NODES.get(key, key.replace("/", "."))
        with open_dict(saved):
            OmegaConf.update(saved, node, OmegaConf.select(composed, node), merge=False)
    with open_dict(saved):
        saved.paths = composed.paths
        saved.task_name = composed.task_name
        if "callbacks" not in {o.split("=", 1)[0] for o in hc.overrides.task}:
            saved.callbacks = composed.callbacks
    return saved


def evaluate(cfg: DictConfig) -> dict[str, float]:
    """Test a checkpoint with its run's config; write ``metrics.json`` and log."""
    quiet_known_warnings()
    route_library_logs()
    run_dir, ckpt = locate_run(cfg)
    saved_path = run_dir / ".hydra" / "config.yaml"
    if not saved_path.is_file():
        raise FileNotFoundError(f"{saved_path} not found: run_dir must be a train.py run directory")
    run_cfg = merge_overrides(OmegaConf.load(saved_path), cfg)
    check_config(run_cfg)
    check_accelerator(run_cfg)
    output_dir = Path(run_cfg.paths.output_dir)
    say(f"evaluating {ckpt} with the config of {run_dir}")
    datamodule, task, trainer, loggers = build(run_cfg, "eval")
    try:
        trainer.test(task, datamodule=datamodule, ckpt_path=str(ckpt), weights_only=True)
        metrics = floats(trainer.callback_metrics)
        write_metrics(output_dir / "metrics.json", metrics)
        report(output_dir, metrics, loggers)
        return metrics
    finally:
        finish(loggers)


GENERATE_OWN_KEYS = {"prompt", "n_tokens", "temperature", "top_k", "seed"}


def generate_text(cfg: DictConfig) -> str:
    """Load an LM run's checkpoint and vocabulary, sample from ``cfg.prompt``, print and save."""
    run_dir, ckpt = locate_run(cfg)
    run_cfg = merge_overrides(
        OmegaConf.load(run_dir / ".hydra" / "config.yaml"), cfg, skip=GENERATE_OWN_KEYS
    )
    task_cls = hydra.utils.get_class(run_cfg.task._target_)
    if not hasattr(task_cls, "generate"):
        raise ValueError(
            f"{run_dir} is a {task_cls.__name__} run; generate.py needs a language model"
        )
    datamodule = hydra.utils.instantiate(run_cfg.data, _convert_="all")
    datamodule.setup("test")
    vocab = datamodule.vocab
    task = task_cls.load_from_checkpoint(ckpt, map_location="cpu", weights_only=True)
    # Unknown prompt words are an error unless the run maps them (data.unk_policy=map).
    prompt = vocab.encode(cfg.prompt, "prompt", getattr(datamodule, "unk_policy", "error"))
    gen = torch.Generator().manual_seed(int(cfg.seed))
    ids = task.generate(
        prompt,
        int(cfg.n_tokens),
        float(cfg.temperature),
        None if cfg.top_k is None else int(cfg.top_k),
        generator=gen,
    )
    text = vocab.decode(ids)
    out = Path(cfg.paths.output_dir) / "generated.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    tokens = [vocab.words[i] for i in ids.tolist()]
    out.write_text(json.dumps({"prompt": cfg.prompt, "tokens": tokens, "text": text}, indent=1))
    say(f"prompt: {cfg.prompt}")
    say(f"sample: {text}")
    say(f"written to {out.resolve()}")
    return text
