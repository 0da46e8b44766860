"""The equilibrium health signal and its warning, on real Lightning runs of known DEQs."""

import logging

import pytest
import pytorch_lightning as pl

from deq_lightning.callbacks.equilibrium import EquilibriumMonitor, describe, remedies
from deq_lightning.datamodules.classification import DigitsDataModule
from deq_lightning.tasks.classification import ClassificationTask


def task_for(gain: float, **schedule) -> ClassificationTask:
    model = {
        "_target_": "tests.helpers.models.LinearDEQClassifier",
        "in_features": 64,
        "num_classes": 10,
        "gain": gain,
        "deq": {"solver": "fixed_point", "solver_opts": {"max_iter": 30, "tol": 1e-4}},
    }
    return ClassificationTask(num_classes=10, model=model, **schedule)


def quiet_trainer(tmp_path, callback: pl.Callback, **limits) -> pl.Trainer:
    """A Trainer without logger, checkpoints or progress output, watched by ``callback``."""
    return pl.Trainer(
        default_root_dir=tmp_path,
        callbacks=[callback],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **limits,
    )


def fit_and_test(task, tmp_path, monitor: EquilibriumMonitor) -> pl.Trainer:
    limits = dict(max_epochs=2, limit_train_batches=3, limit_val_batches=2, limit_test_batches=2)
    trainer = quiet_trainer(tmp_path, monitor, **limits)
    dm = DigitsDataModule(batch_size=32)
    trainer.fit(task, datamodule=dm)
    trainer.fit_metrics = dict(trainer.callback_metrics)
    trainer.test(task, datamodule=dm)
    return trainer


def test_warning_fires_on_a_divergent_deq(tmp_path, caplog):
    monitor = EquilibriumMonitor(min_converged=0.9)
    with caplog.at_level(logging.WARNING, logger="deq_lightning"):
        trainer = fit_and_test(task_for(gain=1.5), tmp_path, monitor)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    train_warnings = [w for w in warnings if "DEQ not at equilibrium" in w and "train:" in w]
    val_warnings = [w for w in warnings if "DEQ not at equilibrium" in w and "val:" in w]
    # Once per stage and kind, although both epochs were unconverged.
    assert len(train_warnings) == 1 and len(val_warnings) == 1
    assert "task.jac_loss_weight" in val_warnings[0] and "solver.damping" in val_warnings[0]
    assert any(w.startswith("NOT at equilibrium. test:") for w in warnings)
    assert trainer.callback_metrics["test/fwd_converged"] == 0.0
    assert trainer.callback_metrics["test/fwd_res_p50"] > 1e-4


def test_no_warning_on_a_healthy_deq(tmp_path, caplog):
    monitor = EquilibriumMonitor(min_converged=0.9)
    with caplog.at_level(logging.INFO, logger="deq_lightning"):
        trainer = fit_and_test(task_for(gain=0.5), tmp_path, monitor)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert any(r.getMessage().startswith("equilibrium held. test:") for r in caplog.records)
    metrics = trainer.callback_metrics
    assert metrics["test/fwd_converged"] == 1.0 and trainer.fit_metrics["val/fwd_converged"] == 1.0
    assert metrics["test/fwd_res_max"] < 1e-4
    # f evaluations run per sample, apart from the returned iterate's index.
    assert (
        1 < metrics["test/fwd_steps"] < 30
        and metrics["test/fwd_nstep"] <= metrics["test/fwd_steps"]
    )


def test_trend_warning_needs_a_sustained_rise():
    monitor = EquilibriumMonitor(trend_patience=3, trend_factor=1.5)
    assert not monitor._trending_up([1e-3, 1.1e-3, 1.2e-3])  # too short
    assert not monitor._trending_up([1e-3, 1.1e-3, 1.2e-3, 1.3e-3])  # rising, but by < 1.5x
    assert not monitor._trending_up([1e-3, 2e-3, 4e-3, 3e-3])  # not rising every epoch
    assert monitor._trending_up([1e-3, 1.3e-3, 1.8e-3, 2.5e-3])


def test_monitor_state_survives_a_checkpoint():
    monitor = EquilibriumMonitor()
    monitor.warned.add("val:converged")
    monitor.history["val"] = [1e-3, 2e-3]
    other = EquilibriumMonitor()
    other.load_state_dict(monitor.state_dict())
    assert other.warned == {"val:converged"} and other.history == {"val": [1e-3, 2e-3]}


def test_bad_monitor_settings_rejected():
    with pytest.raises(ValueError, match="min_converged"):
        EquilibriumMonitor(min_converged=90)
    with pytest.raises(ValueError, match="stages"):
        EquilibriumMonitor(stages=["test"])


def test_remedies_follow_the_config():
    task = task_for(gain=0.5, jac_loss_weight=0.7, max_iter_jitter=2)
    summary = {"solver": "broyden", "max_iter": 10}
    text = "; ".join(remedies(task, summary))
    assert "now 0.7" in text and "solver.max_iter=20" in text and "solver=anderson" in text
    assert "max_iter_jitter" not in text
    assert "task.residual_loss_weight=0.1" in text
    # The budget that ran out is the one to double: the training solve's or an evaluation's.
    train_text = "; ".join(remedies(task, summary, "train"))
    assert "solver.max_iter=20" in train_text and "eval_opts" not in train_text
    eval_text = "; ".join(remedies(task, summary, "val/sintel"))
    assert "solver.eval_opts.max_iter=20" in eval_text and " solver.max_iter" not in eval_text
    text = "; ".join(remedies(task_for(gain=0.5, residual_loss_weight=0.3), summary))
    assert "residual_loss_weight, now 0.3" in text
    line = describe("val", {"converged": 0.5, "res_p50": 1e-3, "res_p90": 1e-2, "res_max": 0.1,
                             "steps": 9.5, "tol": 1e-3, "stop_mode": "rel", "max_iter": 10})  # fmt: skip
    assert line.startswith("val: 50.0% of samples at their fixed point (rel residual < 0.001")


def fit_steps(task, tmp_path, steps: int, callback: pl.Callback) -> pl.Trainer:
    """``steps`` training steps on digits without validation, watched by ``callback``."""
    trainer = quiet_trainer(tmp_path, callback, max_steps=steps, limit_val_batches=0)
    trainer.fit(task, datamodule=DigitsDataModule(batch_size=32))
    return trainer


@pytest.mark.parametrize("start", [0, 0.5])
def test_residual_term_joins_the_loss_from_its_start(tmp_path, start):
    """task.residual_loss_weight adds the residual at the reached state to the training loss
    (logged as train/residual_loss) from task.residual_loss_start on, and only then."""
    task = task_for(gain=0.5, residual_loss_weight=0.5, residual_loss_start=start)
    seen = []

    class Record(pl.Callback):
        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
            seen.append(
                (trainer.global_step, "train/residual_loss_step" in trainer.callback_metrics)
            )

    trainer = fit_steps(task, tmp_path, 4, Record())
    # global_step counts finished optimizer steps: the batch at step s logs after it finishes.
    first_on = next(step for step, logged in seen if logged) - 1
    assert first_on == (0 if start == 0 else 2)
    assert float(trainer.callback_metrics["train/residual_loss_step"]) > 0


def test_residual_term_outside_a_trainer():
    """A training step outside any Trainer (benchmarks measure one): a start given as a fraction
    of the run cannot be placed yet, so the term is off; a start of 0 applies at once."""
    import torch

    x, y = torch.randn(4, 64), torch.tensor([0, 1, 2, 3])
    for start, expected in ((0.5, False), (0, True)):
        task = task_for(gain=0.5, residual_loss_weight=0.5, residual_loss_start=start).train()
        _out, stats = task.run_model(x)
        assert (stats.residual_loss is not None) is expected
        loss = task.add_deq_losses(torch.nn.functional.cross_entropy(_out, y), stats)
        loss.backward()


def test_schedule_points_as_fractions_of_the_run_become_steps():
    """task.pretrain_steps and task.residual_loss_start below 1 are fractions of the run; whole
    numbers are steps and stay; a fraction of a run of no set length is an error that says so."""
    from deq_lightning.config import DEQSchedule

    s = DEQSchedule(pretrain_steps=0.25, residual_loss_start=0.5).resolved(400)
    assert (s.pretrain_steps, s.residual_loss_start) == (100, 200)
    s = DEQSchedule(pretrain_steps=30, residual_loss_start=1).resolved(400)
    assert (s.pretrain_steps, s.residual_loss_start) == (30, 1)
    assert DEQSchedule(pretrain_steps=0.5).resolved(7).pretrain_steps == 4
    with pytest.raises(ValueError, match=r"no set length.*trainer\.max_steps"):
        DEQSchedule(pretrain_steps=0.5).resolved(float("inf"))


def test_pretraining_for_a_fraction_of_the_run(tmp_path):
    """task.pretrain_steps=0.5 of a 6-step run unrolls f for the first 3 steps, then solves."""
    task = task_for(gain=0.5, pretrain_steps=0.5, pretrain_unroll=2)
    seen = []

    class Record(pl.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            seen.append(module.pretraining)

    fit_steps(task, tmp_path, 6, Record())
    assert seen == [True, True, True, False, False, False]
    # Outside a Trainer there is no run yet: no pre-training.
    assert not task_for(gain=0.5, pretrain_steps=0.5).train().pretraining
