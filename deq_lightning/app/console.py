"""Console and log output of the entry points, and the command line that started them."""

from __future__ import annotations

import logging
import warnings

from hydra.core.hydra_config import HydraConfig
from pytorch_lightning.utilities import rank_zero_only

from deq_lightning.loggers import CONSOLE_ECHO

# One logger name for every entry point, so that a run's log file reads alike whatever ran.
log = logging.getLogger("deq_lightning.app")


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


def quiet_known_warnings() -> None:
    """Silence Lightning warnings that our design triggers on purpose."""
    # Ordered LM batches are an IterableDataset with __len__ so no sampler can reorder them.
    warnings.filterwarnings("ignore", message=r".*IterableDataset.*__len__.*")
    # LastCheckpoint puts a mid-epoch resume at the right batch (it says so when it cannot).
    warnings.filterwarnings("ignore", message=r".*resuming from a checkpoint that ended before.*")


def current_overrides() -> list[str]:
    """The command line's overrides (none outside a Hydra app)."""
    return [str(o) for o in HydraConfig.get().overrides.task] if HydraConfig.initialized() else []


def override_key(override: str) -> str:
    """The config key of a command-line override (``+a.b=1`` -> ``a.b``)."""
    return override.split("=", 1)[0].lstrip("+~")


def typed_keys() -> set[str]:
    """The keys the command line sets."""
    return {override_key(o) for o in current_overrides()}


def multirun() -> bool:
    """Whether this process is a job of a Hydra multirun (``-m``)."""
    return HydraConfig.initialized() and str(HydraConfig.get().mode) == "RunMode.MULTIRUN"
