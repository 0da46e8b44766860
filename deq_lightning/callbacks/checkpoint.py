"""A ``last.ckpt`` that a run can always continue from, and continue exactly.

Lightning's ``ModelCheckpoint(save_last=True)`` rewrites ``last.ckpt`` only when it also saves a
top-k checkpoint, i.e. when the monitored metric improves, so a killed run could lose many epochs.
:class:`LastCheckpoint` owns ``last.ckpt`` instead: it writes it at the end of every training epoch
and, optionally, every ``every_n_train_steps`` optimizer steps and every ``every_n_minutes``, whatever
the metrics do. :class:`AtomicCheckpointIO` makes every checkpoint write (last, best, SLURM's hpc)
a temp file plus a rename, so a kill during a write leaves the previous file loadable.

Continuing *exactly* needs more than weights and optimizer: the callback's state in the checkpoint
holds the random number generators (torch, CUDA, numpy, python), how many batches of the current
epoch were consumed and the state of the generator that ordered that epoch. The training sampler is
wrapped (without changing the order a fresh run sees) so that a mid-epoch resume replays that
order and skips the consumed batches. This works for map-style datasets (the sampler decides the
order); an ``IterableDataset`` (the language-model streams) is read past the consumed batches.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from fsspec.implementations.local import LocalFileSystem
from lightning_fabric.utilities.cloud_io import get_filesystem
from pytorch_lightning.callbacks import Checkpoint
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch.utils.data import IterableDataset, RandomSampler, Sampler

log = logging.getLogger(__name__)

LAST = "last.ckpt"


# ------------------------------------------------------------------------------ atomic writes


class AtomicCheckpointIO(TorchCheckpointIO):
    """``torch.save`` to a temp file in the target's directory, fsync, then ``os.replace``.

    Lightning's own writer goes through an fsspec transaction whose temp file lives in the system
    temp dir; when that is another file system (a node-local /tmp, a shared run dir) the final
    step is a copy, which a kill can cut short. A rename within one directory cannot be.
    Remote paths fall back to Lightning's writer.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        bad = nonfinite_tensors(checkpoint.get("state_dict", {}))
        if bad:
            # A checkpoint is never written from non-finite weights: a resume would continue
            # from them. The previous file at ``path`` (if any) stays.
            log.error(
                "not writing %s: %d weight tensor(s) hold NaN or Inf (%s%s)",
                path,
                len(bad),
                ", ".join(bad[:5]),
                ", ..." if len(bad) > 5 else "",
            )
            return
        if storage_options is not None or not isinstance(get_filesystem(path), LocalFileSystem):
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        write_atomic(Path(path), lambda f: torch.save(checkpoint, f))


def nonfinite_tensors(state_dict: dict[str, Any]) -> list[str]:
    """Names of the floating-point tensors of ``state_dict`` holding NaN or Inf."""
    return [
        name
        for name, t in state_dict.items()
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all()
    ]


def write_atomic(path: Path, write: Any) -> None:
    """Call ``write(binary file)`` on a temp file beside ``path``, then rename it over ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ------------------------------------------------------------------------------ random state


def rng_state() -> dict[str, Any]:
    """Every global generator a training step may draw from, as ``weights_only``-loadable data."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "key": np_state["state"]["key"].tolist(),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    npy = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": "MT19937",
            "state": {"key": np.asarray(npy["key"], dtype=np.uint32), "pos": npy["pos"]},
            "has_gauss": npy["has_gauss"],
            "gauss": npy["gauss"],
        }
    )
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ------------------------------------------------------------------------------ data position


class ResumableSampler(Sampler[int]):
    """Wraps a training sampler so that a resumed epoch repeats the interrupted one's order from
    where it stopped.

    Each pass records the state of the generator that orders it in :attr:`epoch_state`; a pass
    that starts with :attr:`resume_state` set replays that state instead, and drops its first
    :attr:`skip` indices. A ``RandomSampler`` without a generator draws its seed from the global
    generator exactly as it would itself (``torch/utils/data/sampler.py``), so a fresh run's order
    is unchanged. Samplers ordered by ``set_epoch`` (``DistributedSampler``) or not at all
    (``SequentialSampler``) need only the skip.
    """

    def __init__(self, inner: Sampler) -> None:
        self.inner, self.skip = inner, 0
        self.epoch_state: torch.Tensor | None = None
        self.resume_state: torch.Tensor | None = None
        self._draws_seed = isinstance(inner, RandomSampler) and inner.generator is None

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        skip, self.skip = self.skip, 0
        resume, self.resume_state = self.resume_state, None
        if isinstance(self.inner, RandomSampler):
            if self._draws_seed:
                generator = torch.Generator()
                if resume is None:
                    generator.manual_seed(int(torch.empty((), dtype=torch.int64).random_().item()))
                self.inner.generator = generator
            if resume is not None:
                self.inner.generator.set_state(resume)
            self.epoch_state = self.inner.generator.get_state()
        return islice(iter(self.inner), skip, None)

    def __len__(self) -> int:
        return len(self.inner)


def _train_loader(trainer: pl.Trainer) -> Any:
    """The (processed) training DataLoader, when there is exactly one."""
    loader = trainer.train_dataloader
    if isinstance(loader, list | tuple) and len(loader) == 1:
        loader = loader[0]
    return loader


# ------------------------------------------------------------------------------ the callback


class LastCheckpoint(Checkpoint):
    """Write ``<dirpath>/last.ckpt`` at every epoch end and every ``every_n_train_steps`` optimizer
    steps / ``every_n_minutes`` of training (``None`` or 0: off), independent of any metric.

    The checkpoint carries this callback's state: the random generators and the position in the
    epoch, restored on resume so that the continued run repeats the uninterrupted one (CPU, same
    seed, ``num_workers=0``). ``restore_data_position=false`` leaves the data loader alone (a
    mid-epoch resume then restarts the epoch's data).

    A step-triggered save on an epoch's last batch is left to the epoch-end save, which follows
    once validation has updated the metric bests.
    """

    def __init__(
        self,
        dirpath: str,
        filename: str = LAST,
        every_n_train_steps: int | None = None,
        every_n_minutes: float | None = 15.0,
        restore_data_position: bool = True,
    ) -> None:
        intervals = {"every_n_train_steps": every_n_train_steps, "every_n_minutes": every_n_minutes}
        for key, value in intervals.items():
            if value is not None and value < 0:
                raise ValueError(
                    f"callbacks.last_checkpoint.{key} must be >= 0 (0 or null: off), got {value}"
                )
        self.dirpath = Path(dirpath)
        self.filename = filename
        self.every_n_train_steps = every_n_train_steps or 0
        self.every_n_seconds = 60.0 * (every_n_minutes or 0.0)
        self.restore_data_position = restore_data_position
        self.last_model_path = ""
        self.saves = 0  # how many times this process wrote last.ckpt (tests, logs)
        self._last_time = time.monotonic()
        self._last_step = -1
        self._sampler: ResumableSampler | None = None
        self._pending: dict[str, Any] | None = None
        self._trainer: pl.Trainer | None = None
        self.failure_note = ""  # what on_exception did, for the run's error message

    @property
    def path(self) -> Path:
        return self.dirpath / self.filename

    # ------------------------------------------------------------------ saving

    def save(self, trainer: pl.Trainer, reason: str) -> None:
        """Write last.ckpt (every rank calls this: saving may be collective)."""
        trainer.save_checkpoint(self.path, weights_only=False)
        self.last_model_path = str(self.path)
        self.saves += 1
        self._last_time = time.monotonic()
        self._last_step = trainer.global_step
        if trainer.is_global_zero:
            log.debug("wrote %s (%s, step %d)", self.path, reason, trainer.global_step)

    def _skip(self, trainer: pl.Trainer) -> bool:
        return bool(trainer.fast_dev_run) or trainer.sanity_checking

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any
    ) -> None:
        step = trainer.global_step
        if (
            self._skip(trainer)
            or trainer.fit_loop.epoch_loop.batch_progress.is_last_batch
            or step == self._last_step  # gradient accumulation: no optimizer step since
        ):
            return
        due_steps = self.every_n_train_steps > 0 and step % self.every_n_train_steps == 0
        due_time = False
        if self.every_n_seconds > 0 and step % max(1, trainer.log_every_n_steps) == 0:
            due_time = time.monotonic() - self._last_time >= self.every_n_seconds
            # Ranks' clocks differ: rank 0 decides (at the logging interval, not every step),
            # or the collective save would hang.
            due_time = bool(trainer.strategy.broadcast(due_time))
        if due_steps or due_time:
            self.save(trainer, "steps" if due_steps else "time")

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self._skip(trainer):
            self.save(trainer, "epoch end")

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """An error during fit (a corrupt file, a non-finite run, a bug) writes last.ckpt before
        it propagates, so up to ``every_n_minutes`` of training are not lost.

        Not on a signal (PreemptionCheckpoint's job) nor Ctrl-C (it may land inside an optimizer
        step); not under several processes (a save is collective and the other ranks may be
        elsewhere); never from non-finite weights. :attr:`failure_note` says what happened.
        """
        self.failure_note = ""
        if (
            trainer.state.fn != "fit"
            or isinstance(exception, SIGTERMException | KeyboardInterrupt)
            or bool(trainer.fast_dev_run)
        ):
            return
        if trainer.world_size > 1:
            self.failure_note = (
                "no checkpoint written at the failure (several processes); the newest "
                f"periodic one is {self.path if self.path.is_file() else 'none'}"
            )
            return
        bad = nonfinite_tensors(pl_module.state_dict())
        if bad:
            self.failure_note = (
                f"the weights hold NaN/Inf ({len(bad)} tensors), so {self.path} was not "
                "overwritten" + (" (it holds an earlier state)" if self.path.is_file() else "")
            )
            return
        try:
            self.save(trainer, "failure")
        except Exception as e:  # the original error matters more than this one
            self.failure_note = f"writing {self.path} failed too ({type(e).__name__}: {e})"
            return
        self.failure_note = f"{self.path} written at step {trainer.global_step}"

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        trainer, consumed = self._trainer, 0
        if trainer is not None and trainer.training:
            progress = trainer.fit_loop.epoch_loop.batch_progress.current
            if progress.ready < trainer.num_training_batches:
                consumed = progress.ready
        epoch_state = self._sampler.epoch_state if self._sampler is not None else None
        return {
            "rng": rng_state(),
            # Batches of the current epoch already trained on (0 at an epoch boundary), and the
            # state of the generator that ordered the epoch.
            "consumed_batches": consumed,
            "sampler_state": epoch_state if consumed else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending = dict(state_dict)

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._trainer = trainer  # state_dict() reads the loop position at save time

    # ------------------------------------------------------------------ resuming
    #
    # Where the uninterrupted run was when it saved decides when the generators are restored:
    # * at an epoch boundary, the next thing it did was to make the next epoch's data iterator
    #   (which draws from the global generator): restore, then make that iterator again (the
    #   resumed run made its own earlier, in Lightning's setup_data, from other generator states).
    # * mid-epoch, that iterator was made long before the save: restore after the resumed run
    #   made its own, and replay the epoch's order from the saved sampler state.

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Wrap the sampler, position the data in the interrupted epoch, restore the generators."""
        self._last_time = time.monotonic()
        pending, self._pending = self._pending, None
        consumed = int(pending.get("consumed_batches", 0)) if pending else 0
        installed = self.restore_data_position and self._install_sampler(trainer)
        # Lightning's private fetcher: the only handle on the epoch's iterator (guarded).
        fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
        if installed and consumed:
            self._sampler.skip = consumed * int(_train_loader(trainer).batch_sampler.batch_size)
            self._sampler.resume_state = pending.get("sampler_state")
        if pending is not None and not consumed:
            set_rng_state(pending["rng"])
        # Workers take their indices when the iterator is made, so the wrapper only orders an
        # iterator made after it is installed.
        workers = installed and _train_loader(trainer).num_workers > 0
        if fetcher is not None and ((pending is not None and not consumed) or workers):
            iter(fetcher)
        read_past = (
            not installed
            and consumed > 0
            and self.restore_data_position
            and fetcher is not None
            and getattr(fetcher, "length", None) is not None  # sized: nothing prefetched
        )
        if read_past:
            for _ in range(consumed):
                next(fetcher.iterator)
        if pending is not None and consumed > 0:
            set_rng_state(pending["rng"])
            where = f"batch {consumed} of epoch {trainer.current_epoch}"
            if read_past:
                where += f" (read past the stream's first {consumed} batches)"
            elif not installed:
                where += (
                    ": this data loader cannot skip batches, so the epoch's data restarts from "
                    "its beginning (its step count continues)"
                )
            if trainer.is_global_zero:
                log.info("resuming mid-epoch at %s", where)

    def _install_sampler(self, trainer: pl.Trainer) -> bool:
        loader = _train_loader(trainer)
        batch_sampler = getattr(loader, "batch_sampler", None)
        if isinstance(getattr(loader, "dataset", None), IterableDataset) or batch_sampler is None:
            return False
        if not isinstance(batch_sampler.sampler, ResumableSampler):
            batch_sampler.sampler = ResumableSampler(batch_sampler.sampler)
        self._sampler = batch_sampler.sampler
        return True
