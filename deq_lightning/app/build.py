"""The objects of a run made from its config: DataModule, task, callbacks, loggers, trainer."""

from __future__ import annotations

import inspect
import netrc
import os
import secrets
import string
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.loggers import Logger, TensorBoardLogger, WandbLogger
from pytorch_lightning.plugins.io import CheckpointIO
from pytorch_lightning.utilities import rank_zero_only

from deq_lightning.app.console import say
from deq_lightning.app.sweeps import sweep_group, sweep_job_name
from deq_lightning.callbacks.checkpoint import AtomicCheckpointIO
from deq_lightning.loggers import continue_offline_wandb_step

WANDB_ID_FILE = "wandb_run_id.txt"


def build(
    cfg: DictConfig, job_type: str, resume_step: int | None = None
) -> tuple[pl.LightningDataModule, pl.LightningModule, pl.Trainer, list[Logger]]:
    """DataModule, task, trainer and loggers of ``cfg`` (``job_type``: W&B's train / eval)."""
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


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """A dict of ``_target_`` configs (callbacks, loggers) -> objects; entries set to null skip."""
    if not cfg:
        return []
    return [
        hydra.utils.instantiate(c, _convert_="all") for c in cfg.values() if c and "_target_" in c
    ]


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


# ------------------------------------------------------------------------------ loggers


def wandb_mode() -> str:
    """``online`` when an API key is configured, else ``offline`` (``WANDB_MODE`` wins)."""
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    try:
        if netrc.netrc().authenticators("api.wandb.ai"):
            return "online"
    except (FileNotFoundError, netrc.NetrcParseError):
        pass
    return "offline"


def instantiate_loggers(
    cfg: DictConfig, output_dir: Path, job_type: str, resume_step: int | None = None
) -> list[Logger]:
    """Loggers that keep one continuous record per run dir.

    W&B: see :func:`wandb_settings`. When the run continues from a checkpoint at
    ``resume_step``, CSV rows and TensorBoard events from that step on (written after the
    checkpoint by the interrupted process) are dropped, so the continued record has no duplicate
    steps.
    """
    loggers: list[Logger] = []
    for conf in (cfg.get("logger") or {}).values():
        if not conf or "_target_" not in conf:
            continue
        conf = OmegaConf.to_container(conf, resolve=True)
        cls = hydra.utils.get_class(conf["_target_"])
        if issubclass(cls, WandbLogger):
            wandb_settings(conf, output_dir, job_type, cfg.get("task_name"))
        elif resume_step is not None and issubclass(cls, TensorBoardLogger):
            conf.setdefault("purge_step", resume_step)
        elif resume_step is not None and "resume_step" in inspect.signature(cls).parameters:
            conf.setdefault("resume_step", resume_step)
        loggers.append(hydra.utils.instantiate(conf))
    return loggers


def wandb_settings(conf: dict, output_dir: Path, job_type: str, task_name: str | None) -> None:
    """Fill a W&B logger's config in place: the run dir's persistent id (resume),
    ``WANDB_DIR`` = the run dir (so no process, spawned ranks included, writes to ``./wandb``),
    offline without an API key, a sweep group and, in a multirun, a name made of the job's swept
    overrides."""
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
    if name and conf.get("name") in (None, task_name):
        conf["name"] = name


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


def predict_to(
    writer: pl.callbacks.BasePredictionWriter,
    cfg: DictConfig,
    task: pl.LightningModule,
    **data: Any,
) -> None:
    """``trainer.predict`` with the run's trainer config, ``writer`` writing every batch's
    predictions (``data``: ``datamodule=`` or ``dataloaders=``)."""
    trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=[writer], logger=False, _convert_="all"
    )
    trainer.predict(task, return_predictions=False, **data)
