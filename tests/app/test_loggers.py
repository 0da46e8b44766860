"""The CSV logger keeps every stage's rows when stages run in separate processes."""

import copy
import csv

from deq_lightning.loggers import CSVLogger


def test_csv_logger_merges_header_of_an_earlier_process(tmp_path):
    logger = CSVLogger(save_dir=tmp_path, name="csv")
    logger.log_hyperparams({"lr": 0.1})
    fit_copy, test_copy = copy.deepcopy(logger), copy.deepcopy(logger)  # what ddp_spawn pickles
    fit_copy.log_metrics({"train/loss": 1.0, "val/acc": 0.5}, step=0)
    fit_copy.save()
    test_copy.log_metrics({"test/acc": 0.75}, step=1)
    test_copy.save()
    with open(tmp_path / "csv" / "version_0" / "metrics.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [r["step"] for r in rows] == ["0", "1"]
    assert (
        rows[0]["val/acc"] == "0.5" and rows[1]["test/acc"] == "0.75" and rows[1]["val/acc"] == ""
    )
