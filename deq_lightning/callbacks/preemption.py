"""Stop at a batch boundary when the job is told to stop, write ``last.ckpt``, and let the same
command (or the cluster's requeue) continue from it.

* SIGTERM (``kill``, SLURM preemption): Lightning finishes the current batch and raises
  ``SIGTERMException``; :meth:`PreemptionCheckpoint.on_exception` writes ``last.ckpt`` there, where
  the state is consistent, and ``deq_lightning.app.train.train`` exits with :data:`EXIT_RESUMABLE`.
* SIGUSR1 (what many clusters send before the time limit) takes the same path, except under
  Lightning's SLURM auto-requeue (a plain ``sbatch`` job), which owns SIGUSR1: it writes
  ``hpc_ckpt_<n>.ckpt`` and requeues the job; SLURM's SIGTERM then takes the path above.
* Under the submitit launcher (``hydra/launcher=slurm`` or ``local``), submitit's requeue signal
  (SIGUSR2 unless ``SUBMITIT_PREEMPT_SIGNAL`` says otherwise) is deferred: the run stops at the
  batch boundary, writes ``last.ckpt``, and only then submitit requeues the same job, which
  resumes from that file.

Ctrl-C (KeyboardInterrupt) can land inside an optimizer step, so it writes nothing: the run
resumes from the last periodic ``last.ckpt``.
"""

from __future__ import annotations

import functools
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from lightning_fabric.plugins.environments import SLURMEnvironment
from pytorch_lightning.utilities import rank_zero_info
from pytorch_lightning.utilities.exceptions import SIGTERMException

# sysexits.h EX_TEMPFAIL ("temporary failure, retry"): stopped by a signal after writing
# last.ckpt; running the same command continues the run.
EXIT_RESUMABLE = 75


def submitit_signal() -> signal.Signals | None:
    """The signal submitit requeues on, when this process is a submitit job."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):
        return None
    return getattr(signal, "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2"), None)


def _handled(signum: int) -> bool:
    return signal.getsignal(signum) not in (signal.SIG_DFL, signal.SIG_IGN, None)


class PreemptionCheckpoint(pl.Callback):
    """Write ``<dirpath>/<filename>`` when fitting stops on SIGTERM / SIGUSR1 / submitit's signal.

    After the exception, :attr:`requeue` holds submitit's own handler when submitit's signal
    caused the stop; the caller runs it (it requeues the job and exits).
    """

    def __init__(self, dirpath: str, filename: str = "last.ckpt") -> None:
        self.path = Path(dirpath) / filename
        self.requeue: Callable[[], Any] | None = None
        self.saved = False
        self._originals: dict[int, Any] = {}

    def _install(self, signum: int, handler: Callable[[int, Any], None]) -> None:
        self._originals.setdefault(signum, signal.getsignal(signum))
        signal.signal(signum, handler)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.requeue, self.saved = None, False
        env = trainer._accelerator_connector.cluster_environment
        lightning_requeues = isinstance(env, SLURMEnvironment) and env.auto_requeue
        if hasattr(signal, "SIGUSR1") and not lightning_requeues and not _handled(signal.SIGUSR1):
            self._install(signal.SIGUSR1, self._to_sigterm)
        sig = submitit_signal()
        if sig is not None and _handled(sig):
            self._install(sig, functools.partial(self._defer, signal.getsignal(sig)))

    @staticmethod
    def _to_sigterm(signum: int, frame: Any) -> None:
        os.kill(os.getpid(), signal.SIGTERM)

    def _defer(self, submitit_handler: Callable, signum: int, frame: Any) -> None:
        """Submitit would requeue and exit right now, in the middle of a step: first stop at
        the batch boundary and save (Lightning's SIGTERM path), then let submitit requeue."""
        self.requeue = functools.partial(submitit_handler, signum, None)
        os.kill(os.getpid(), signal.SIGTERM)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            trainer.save_checkpoint(self.path, weights_only=False)
            self.saved = True
            rank_zero_info(
                f"Stopped by a signal at step {trainer.global_step}; saved {self.path}. "
                "Run the same command again to continue."
            )
        self._restore_handlers()  # Lightning calls no teardown hook after an exception

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._restore_handlers()

    def _restore_handlers(self) -> None:
        for signum, handler in self._originals.items():
            signal.signal(signum, handler)
        self._originals.clear()
