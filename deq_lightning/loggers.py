"""Logger fixes the stock Lightning loggers need for DEQ runs."""

from __future__ import annotations

import csv

from pytorch_lightning.loggers import CSVLogger as _LightningCSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment


class _HeaderAwareWriter(ExperimentWriter):
    """Starts from the header already on disk.

    Lightning's writer only knows the keys it logged itself; under ``ddp_spawn`` the test stage runs
    in a fresh process whose writer has never seen the fit stage's keys, so its first save rewrites
    ``metrics.csv`` with a header missing them and crashes.
    """

    def _record_new_keys(self) -> set[str]:
        if not self.metrics_keys and self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as file:
                self.metrics_keys.extend(next(csv.reader(file), []))
        return super()._record_new_keys()


class CSVLogger(_LightningCSVLogger):
    """Lightning's CSV logger whose metrics file survives stages run in separate processes."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _HeaderAwareWriter(log_dir=self.log_dir)
        return self._experiment
