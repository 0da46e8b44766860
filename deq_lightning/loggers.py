"""Logger fixes the stock Lightning loggers need for DEQ runs, and for runs that resume."""

from __future__ import annotations

import csv
import io
import logging
import struct
from pathlib import Path

from pytorch_lightning.loggers import CSVLogger as _LightningCSVLogger
from pytorch_lightning.loggers import WandbLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment
from pytorch_lightning.utilities import rank_zero_only

from deq_lightning.callbacks.checkpoint import write_atomic

# A log record attribute: the message was already printed to the console (:func:`deq_lightning.app.console.say`).
CONSOLE_ECHO = "console_echo"


class SkipConsoleEcho(logging.Filter):
    """For the console handler: drop records the run already printed itself, so they reach the
    log file only (``conf/hydra/default.yaml``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, CONSOLE_ECHO, False)


class _HeaderAwareWriter(ExperimentWriter):
    """Appends to the ``metrics.csv`` already on disk, starting from its header.

    Lightning's writer only knows the keys it logged itself; under ``ddp_spawn`` the test stage runs
    in a fresh process whose writer has never seen the fit stage's keys, so its first save rewrites
    ``metrics.csv`` with a header missing them and crashes. The same holds for a resumed run, whose
    new writer would also delete the file (Lightning's "previous log files will be deleted").
    """

    def _check_log_dir_exists(self) -> None:
        """Keep the file: one run dir, one continuous record (see :class:`CSVLogger`)."""

    def _record_new_keys(self) -> set[str]:
        if not self.metrics_keys and self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys.extend(next(csv.reader(file), []))
        return super()._record_new_keys()


class CSVLogger(_LightningCSVLogger):
    """Lightning's CSV logger whose metrics file survives stages run in separate processes and
    resumed runs.

    ``resume_step``: the run continues from a checkpoint written at this step; rows from that
    step on (logged by the interrupted process after its checkpoint, and logged again now) are
    dropped from ``metrics.csv`` before anything is appended, so its steps stay in order.
    """

    def __init__(self, *args: object, resume_step: int | None = None, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            metrics = Path(self.log_dir) / ExperimentWriter.NAME_METRICS_FILE
            if self.resume_step is not None and metrics.is_file():
                truncate_csv(metrics, self.resume_step)
            self._experiment = _HeaderAwareWriter(log_dir=self.log_dir)
        return self._experiment


def truncate_csv(path: Path, step: int) -> None:
    """Drop the rows of a Lightning ``metrics.csv`` whose ``step`` is ``>= step``."""
    with open(path, newline="") as file:
        reader = csv.DictReader(file)
        fields = reader.fieldnames or []
        rows = [r for r in reader if not r.get("step") or int(float(r["step"])) < step]
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_atomic(path, lambda f: f.write(out.getvalue().encode()))


# ------------------------------------------------------------------------------ W&B offline


def wandb_history_steps(run_file: Path) -> list[int]:
    """W&B's ``_step`` of every history row in an offline run file (``run-<id>.wandb``).

    The file is a LevelDB-style log: a 7-byte header, then 32 KiB blocks of fragments (4-byte CRC,
    2-byte little-endian length, 1-byte type: 1 full, 2 first, 3 middle, 4 last) whose payloads
    are ``wandb_internal_pb2.Record`` protobufs.
    """
    from wandb.proto import wandb_internal_pb2 as pb  # lazy: wandb is slow to import

    data, block, header = Path(run_file).read_bytes(), 32768, 7
    steps, pos, pending = [], header, b""
    while pos + header <= len(data):
        left = block - pos % block
        if left < header:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + header])
        if length == 0 and kind == 0:
            pos += left
            continue
        payload, pos = data[pos + header : pos + header + length], pos + header + length
        if kind in (1, 4):
            record = pb.Record()
            try:
                record.ParseFromString(pending + payload)
            except Exception:  # a record cut by a kill: the file ends here
                break
            if record.WhichOneof("record_type") == "history":
                steps.append(int(record.history.step.num))
            pending = b""
        else:
            pending += payload
    return steps


@rank_zero_only
def continue_offline_wandb_step(logger: WandbLogger, resume_step: int) -> None:
    """Continue W&B's ``_step`` after the earlier offline pieces of this run.

    W&B cannot resume an offline run: each process writes its own ``offline-run-*-<id>`` folder
    whose ``_step`` starts at 0, and a later piece synced into the same run would go back in
    time. The first row of a resumed piece is therefore logged at one past the highest step of
    the earlier pieces (with ``trainer/resumed_at_step``), so ``wandb sync --id <id> <pieces>``
    gives one history in order. Online, W&B continues the step itself.
    """
    run = logger.experiment
    if run is None or not getattr(run, "offline", False) or getattr(run, "disabled", False):
        return
    own = Path(run.dir).parent
    earlier = [p for p in own.parent.glob(f"offline-run-*-{run.id}") if p != own]
    steps = [s for p in earlier for f in p.glob("run-*.wandb") for s in wandb_history_steps(f)]
    if steps:
        run.log({"trainer/resumed_at_step": resume_step}, step=max(steps) + 1)
