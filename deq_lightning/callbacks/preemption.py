"""Save a resumable checkpoint when the job is told to stop (SLURM preemption, ``kill``).

Lightning turns SIGTERM into a clean stop at the end of the current batch and then calls
``on_exception``; this callback writes ``last.ckpt`` there, so restarting the run with the same
output directory (or ``ckpt_path=last``) resumes from that very step. SIGUSR1, SLURM's usual
"time is nearly up" signal, is routed to the same path unless Lightning's own SLURM auto-requeue
already handles it.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.exceptions import SIGTERMException


def _forward_to_sigterm(signum: int, frame: object) -> None:
    os.kill(os.getpid(), signal.SIGTERM)


class PreemptionCheckpoint(pl.Callback):
    def __init__(self, dirpath: str, filename: str = "last.ckpt") -> None:
        self.path = Path(dirpath) / filename

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if hasattr(signal, "SIGUSR1") and signal.getsignal(signal.SIGUSR1) in (
            signal.SIG_DFL,
            None,
        ):
            signal.signal(signal.SIGUSR1, _forward_to_sigterm)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if (
            isinstance(exception, SIGTERMException | KeyboardInterrupt)
            and trainer.state.fn == "fit"
        ):
            trainer.save_checkpoint(self.path)
            rank_zero_info(f"Stopped by signal; saved a resumable checkpoint to {self.path}")
