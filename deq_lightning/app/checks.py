"""Checks of a composed config made before any data is read, each naming the key and the fix."""

from __future__ import annotations

import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from deq_lightning.app.console import multirun, say, typed_keys
from deq_lightning.config import check_task_config, drop_unused_keys


def check_config(cfg: DictConfig) -> None:
    """Fail before any data is read when a value is impossible, naming the key."""
    dropped = drop_unused_keys(cfg, typed_keys())
    if dropped:
        say(
            f"ignored {', '.join(dropped)}: set by the config files for another solver or "
            "backward mode than the chosen one"
        )
    check_task_config(cfg.task)
    if cfg.get("data") is not None and "batch_size" in cfg.data:
        world = world_size(cfg.trainer)
        bs = cfg.data.batch_size
        if world and (bs < 1 or bs % world):
            raise ValueError(
                f"data.batch_size={bs} is not divisible by the world size {world} "
                f"(trainer.devices x trainer.num_nodes); set data.batch_size to a multiple of {world}"
            )


def apply_trainer_choice(cfg: DictConfig) -> None:
    """``trainer=cpu`` on an experiment written for several GPUs: one CPU process, unless the
    command line sets ``trainer.devices`` (an experiment's ``devices: 4`` means 4 GPUs, and as
    4 CPU processes it would silently run a multi-process CPU job)."""
    if not HydraConfig.initialized():
        return
    choice = HydraConfig.get().runtime.choices.get("trainer")
    typed = typed_keys()
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
    if not multirun() or "submitit" in str(HydraConfig.get().launcher.get("_target_", "")):
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
    if relaunches and world_size(cfg.trainer) != 1:
        raise SystemExit(
            f"error: a multirun (-m) cannot use strategy={choice or name} with several "
            "processes: Lightning re-runs the command in each rank, which re-runs the sweep and "
            "hangs. Use "
            "strategy=ddp_spawn (or ddp_fork) for local sweeps, or hydra/launcher=slurm "
            "(submitit: SLURM starts the ranks) on a cluster."
        )


def world_size(trainer: DictConfig) -> int | None:
    """Processes the trainer config asks for; ``None`` for ``auto`` / ``-1`` (known only once
    the trainer exists, and checked again in setup)."""
    devices, nodes = trainer.get("devices", 1), trainer.get("num_nodes", 1) or 1
    if isinstance(devices, int) and devices > 0:
        return devices * nodes
    if isinstance(devices, list | tuple):
        return len(devices) * nodes
    return None
