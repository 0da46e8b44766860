"""What ``train.py`` and ``eval.py`` do, as plain functions of a composed config.

Kept out of the entry points so that tests (and notebooks) can call them directly.
"""

from __future__ import annotations

import json
import math
import netrc
import os
import secrets
import string
import warnings
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.loggers import Logger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only

from deq_lightning.deq import DEQ
from deq_lightning.tasks.base import deq_kwargs, plain

WANDB_ID_FILE = "wandb_run_id.txt"


def say(msg: str) -> None:
    """Console output of the run (rank 0 only), kept apart from Python logging on purpose."""
    if rank_zero_only.rank == 0:
        print(f"[deq-lightning] {msg}", flush=True)


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
                f"invalid solver/backward config (conf groups solver, backward): {e}"
            ) from None
    if cfg.get("data") is not None and "batch_size" in cfg.data:
        world = _world_size(cfg.trainer)
        bs = cfg.data.batch_size
        if world and (bs < 1 or bs % world):
            raise ValueError(
                f"data.batch_size={bs} is not divisible by the world size {world} "
                f"(trainer.devices x trainer.num_nodes); set data.batch_size to a multiple of {world}"
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


def instantiate_loggers(cfg: DictConfig, output_dir: Path, job_type: str) -> list[Logger]:
    """Loggers; W&B gets a persistent run id (resume), a sweep group and offline mode if needed."""
    loggers: list[Logger] = []
    for conf in (cfg.get("logger") or {}).values():
        if not conf or "_target_" not in conf:
            continue
        conf = OmegaConf.to_container(conf, resolve=True)
        if conf["_target_"].endswith("WandbLogger"):
            conf.setdefault("job_type", job_type)
            conf["id"] = conf.get("id") or persistent_wandb_id(output_dir)
            conf.setdefault("resume", "allow")
            mode = wandb_mode()
            if mode == "offline":
                conf["offline"] = True
            elif mode == "disabled":
                conf["mode"] = "disabled"
            group = sweep_group()
            if group and not conf.get("group"):
                conf["group"] = group
        loggers.append(hydra.utils.instantiate(conf))
    return loggers


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


def sweep_group() -> str | None:
    """In a multirun, jobs of one sweep share a W&B group named after the sweep directory."""
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if str(hc.mode) != "RunMode.MULTIRUN":
        return None
    return Path(hc.sweep.dir).name


def resume_path(cfg: DictConfig, ckpt_dir: Path) -> str | None:
    """``ckpt_path`` as given; else ``last.ckpt`` of this run dir when the run is a restart."""
    if cfg.get("ckpt_path"):
        return cfg.ckpt_path
    last = ckpt_dir / "last.ckpt"
    if cfg.get("resume", True) and last.exists():
        say(f"resuming from {last}")
        return str(last)
    return None


# ------------------------------------------------------------------------------ train / eval


def build(
    cfg: DictConfig, job_type: str
) -> tuple[pl.LightningDataModule, pl.LightningModule, pl.Trainer, list[Logger]]:
    output_dir = Path(cfg.paths.output_dir)
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    task = hydra.utils.instantiate(cfg.task, _recursive_=False)
    callbacks = instantiate_group(cfg.get("callbacks"))
    loggers = instantiate_loggers(cfg, output_dir, job_type)
    # Drop callbacks the trainer would refuse: a progress bar when bars are off, and
    # LearningRateMonitor without a logger.
    if cfg.trainer.get("enable_progress_bar") is False:
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.ProgressBar)]
    if not loggers:
        callbacks = [c for c in callbacks if not isinstance(c, pl.callbacks.LearningRateMonitor)]
    trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, _convert_="all"
    )
    for logger in loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))
    return datamodule, task, trainer, loggers


def quiet_known_warnings() -> None:
    """Silence Lightning warnings that our design triggers on purpose."""
    # Ordered LM batches are an IterableDataset with __len__ so no sampler can reorder them.
    warnings.filterwarnings("ignore", message=r".*IterableDataset.*__len__.*")


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit, then test the best checkpoint; write ``metrics.json``; return the final metrics."""
    quiet_known_warnings()
    check_config(cfg)
    if cfg.get("seed") is not None:
        pl.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    say(f"run directory: {output_dir.resolve()}")
    datamodule, task, trainer, loggers = build(cfg, "train")
    try:
        if cfg.get("train", True):
            ckpt = resume_path(cfg, output_dir / "checkpoints")
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
        return metrics
    finally:
        finish(loggers)


def best_checkpoint(trainer: pl.Trainer) -> str | None:
    cb = trainer.checkpoint_callback
    if cb is None or trainer.fast_dev_run:
        return None
    return cb.best_model_path or cb.last_model_path or None


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
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(clean, indent=2) + "\n")
    os.replace(tmp, path)


@rank_zero_only
def report(output_dir: Path, metrics: dict[str, float], loggers: list[Logger]) -> None:
    shown = {k: v for k, v in metrics.items() if k.startswith(("test/", "val/"))}
    say("final metrics: " + ", ".join(f"{k}={v:.4g}" for k, v in shown.items()))
    headline = headline_metrics(metrics)
    if headline:
        say(headline)
    say(f"metrics written to {output_dir.resolve() / 'metrics.json'}")
    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger.experiment is not None:
            run_dir = getattr(logger.experiment, "dir", None)
            if run_dir and wandb_mode() == "offline":
                say(f"W&B ran offline; upload later with: wandb sync {Path(run_dir).parent}")


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
    run_dir, ckpt = locate_run(cfg)
    saved_path = run_dir / ".hydra" / "config.yaml"
    if not saved_path.is_file():
        raise FileNotFoundError(f"{saved_path} not found: run_dir must be a train.py run directory")
    run_cfg = merge_overrides(OmegaConf.load(saved_path), cfg)
    check_config(run_cfg)
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
