"""Say when a DEQ is not at its equilibrium, and what in the config would bring it back.

A DEQ whose solver stops at its budget is an unrolled network with the implicit gradient of a
fixed point it never reached; its accuracy can look fine while the thesis's guarantees are gone.
This callback reads the task's per-epoch equilibrium health (converged fraction and residual
quantiles over every sample, :meth:`~deq_lightning.tasks.base.DEQTask.equilibrium_summary`) and

* warns, once per stage and kind, when the converged fraction falls below ``min_converged`` or
  the median residual rises over ``trend_patience`` consecutive epochs (by ``trend_factor``
  overall), naming the remedies the config offers;
* states at the end of every test whether the model was at its fixed point.

Warnings go to the Python log (console and the run's log file) and to W&B / TensorBoard.
Shallow pre-training is skipped: the model is not a DEQ yet.
"""

from __future__ import annotations

import logging
from itertools import pairwise
from typing import Any

import pytorch_lightning as pl
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from pytorch_lightning.utilities import rank_zero_only

log = logging.getLogger(__name__)


def describe(stage: str, summary: dict[str, Any]) -> str:
    """One line on the equilibrium of a stage's solves."""
    budget = f" within {summary['max_iter']} steps" if "max_iter" in summary else ""
    tol = (
        f" ({summary['stop_mode']} residual < {summary['tol']:g}{budget})"
        if "tol" in summary
        else ""
    )
    return (
        f"{stage}: {summary['converged']:.1%} of samples at their fixed point{tol}; "
        f"residual median {summary['res_p50']:.2g}, 90th percentile {summary['res_p90']:.2g}, "
        f"worst {summary['res_max']:.2g}; {summary['steps']:.1f} solver steps run per sample"
    )


def remedies(
    pl_module: pl.LightningModule, summary: dict[str, Any], stage: str | None = None
) -> list[str]:
    """The config changes that move a DEQ back to its fixed point, given what it uses now.

    ``stage`` (``train``, ``val/<set>``, ``predict``, ...) names the budget that ran out: the
    training solve's (``solver.max_iter``) or an evaluation's (``solver.eval_opts.max_iter``);
    doubling one must not suggest shrinking the other. ``None``: both."""
    out = []
    schedule = getattr(pl_module, "schedule", None)
    weight = getattr(schedule, "jac_loss_weight", 0.0)
    if weight:
        out.append(f"a larger Jacobian weight (task.jac_loss_weight, now {weight:g})")
    else:
        out.append(
            "Jacobian regularisation: task.jac_loss_weight=0.5 task.jac_loss_freq=0.5 "
            "(the thesis uses 0.4-2.5)"
        )
    budget = summary.get("max_iter")
    more = f"={2 * budget}" if budget else ""
    training = None if stage is None else stage.split("/")[0] == "train"
    keys = [f"solver.max_iter{more} (training)"] if training is not False else []
    keys += [f"solver.eval_opts.max_iter{more} (evaluation)"] if not training else []
    out.append("a larger solver budget: " + " or ".join(keys))
    model = getattr(pl_module, "model", None)
    if model is not None and getattr(model, "pre_lnorm", True) is False:
        out.append("pre-layer-norm: model.pre_lnorm=true")
    solver = summary.get("solver")
    if solver == "fixed_point":
        out.append("damping: solver.damping=0.3")
        if not training:
            out.append("an accelerated evaluation solve: solver.eval_opts.solver=anderson")
    elif solver == "anderson":
        out.append("damped mixing: solver.beta=0.8")
    elif solver == "broyden":
        out.append("solver=anderson (less prone to blow-ups)")
    if schedule is not None and not getattr(schedule, "max_iter_jitter", 0):
        out.append("a randomised training budget: task.max_iter_jitter=2")
    residual = getattr(schedule, "residual_loss_weight", None)
    if residual is not None:
        out.append(
            f"a larger residual term (task.residual_loss_weight, now {residual:g})"
            if residual
            else "a residual term: task.residual_loss_weight=0.1 (trains the state the solver "
            "reached toward a fixed point; see docs/equilibrium.md)"
        )
    return out


class EquilibriumMonitor(pl.Callback):
    """Warn when a DEQ leaves its equilibrium; report the test stage's equilibrium at the end.

    ``min_converged``: the fraction of samples that must meet the solver's tolerance.
    ``trend_patience``/``trend_factor``: warn when the median residual rose at each of the last
    ``trend_patience`` epochs and is ``trend_factor`` times its lowest. ``stages``: which of
    ``train``/``val`` are watched (test is always reported).
    """

    def __init__(
        self,
        min_converged: float = 0.9,
        trend_patience: int = 3,
        trend_factor: float = 1.5,
        stages: tuple[str, ...] | list[str] = ("train", "val"),
    ) -> None:
        if not 0.0 <= min_converged <= 1.0:
            raise ValueError(f"min_converged is a fraction in [0, 1], got {min_converged}")
        if trend_patience < 1 or trend_factor <= 1.0:
            raise ValueError(
                f"need trend_patience >= 1 and trend_factor > 1, got {trend_patience} and "
                f"{trend_factor}"
            )
        unknown = set(stages) - {"train", "val"}
        if unknown:
            raise ValueError(f"stages may hold 'train' and 'val', got {sorted(unknown)}")
        self.min_converged = min_converged
        self.trend_patience, self.trend_factor = trend_patience, trend_factor
        self.stages = tuple(stages)
        self.warned: set[str] = set()
        self.history: dict[str, list[float]] = {}
        self.reports: list[str] = []  # every line this callback said, in order (also for tests)

    # -------------------------------------------------------------------- hooks

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "train" in self.stages:
            self._check(trainer, pl_module, "train")

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "val" in self.stages and not trainer.sanity_checking:
            self._check(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for stage, summary in self._summaries(pl_module, "test"):
            ok = summary["converged"] >= self.min_converged
            line = describe(stage, summary)
            if ok:
                self._say(trainer, f"equilibrium held. {line}", warn=False)
            else:
                self._warn(
                    trainer,
                    pl_module,
                    summary,
                    f"NOT at equilibrium. {line}. Below {self.min_converged:.0%}, the outputs "
                    "are those of an unrolled network, not of a fixed point.",
                    key=f"{stage}:final",
                    stage=stage,
                )

    def state_dict(self) -> dict[str, Any]:
        return {"warned": sorted(self.warned), "history": self.history}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.warned = set(state_dict.get("warned", ()))
        self.history = {k: list(v) for k, v in state_dict.get("history", {}).items()}

    # -------------------------------------------------------------------- checks

    def _summaries(self, pl_module: pl.LightningModule, stage: str) -> list[tuple[str, dict]]:
        if not hasattr(pl_module, "equilibrium_summary"):
            return []
        out = []
        for name in pl_module.equilibrium_stages(stage):
            summary = pl_module.equilibrium_summary(name)  # on every rank: it syncs
            if summary is not None:
                out.append((name, summary))
        return out

    def _check(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if _in_pretraining(pl_module):
            return
        for name, summary in self._summaries(pl_module, stage):
            line = describe(name, summary)
            epoch = f"epoch {trainer.current_epoch}, step {trainer.global_step}"
            if summary["converged"] < self.min_converged:
                self._warn(
                    trainer,
                    pl_module,
                    summary,
                    f"DEQ not at equilibrium ({epoch}). {line}; below the {self.min_converged:.0%} "
                    "threshold (callbacks.equilibrium.min_converged).",
                    key=f"{name}:converged",
                    stage=name,
                )
            history = self.history.setdefault(name, [])
            history.append(summary["res_p50"])
            if self._trending_up(history):
                self._warn(
                    trainer,
                    pl_module,
                    summary,
                    f"DEQ drifting off its equilibrium ({epoch}): the median {name} residual rose "
                    f"for {self.trend_patience} epochs in a row, from {min(history):.2g} to "
                    f"{history[-1]:.2g}. {line}.",
                    key=f"{name}:trend",
                    stage=name,
                )

    def _trending_up(self, history: list[float]) -> bool:
        n = self.trend_patience
        if len(history) < n + 1:
            return False
        recent = history[-(n + 1) :]
        rising = all(b > a for a, b in pairwise(recent))
        return rising and history[-1] >= self.trend_factor * min(history)

    # -------------------------------------------------------------------- output

    def _warn(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        summary: dict[str, Any],
        text: str,
        key: str,
        stage: str,
    ) -> None:
        """A warning (once per ``key``) followed by the remedies for ``pl_module``."""
        remedy = "; ".join(remedies(pl_module, summary, stage))
        self._say(trainer, f"{text} Try: {remedy}", warn=True, key=key)

    def _say(self, trainer: pl.Trainer, text: str, warn: bool, key: str | None = None) -> None:
        if warn and key is not None:
            if key in self.warned:
                return
            self.warned.add(key)
        self.reports.append(text)
        self._emit(trainer, text, warn)

    @rank_zero_only
    def _emit(self, trainer: pl.Trainer, text: str, warn: bool) -> None:
        (log.warning if warn else log.info)(text)
        if not warn:
            return
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                run = logger.experiment
                key = f"equilibrium/warning_{len(self.warned)}"
                if run is not None and hasattr(run, "summary"):
                    run.summary[key] = text
                    logger.log_text(
                        key="equilibrium/warnings",
                        columns=["step", "warning"],
                        data=[[trainer.global_step, text]],
                    )
            elif isinstance(logger, TensorBoardLogger):
                logger.experiment.add_text("equilibrium/warning", text, trainer.global_step)


def _in_pretraining(pl_module: pl.LightningModule) -> bool:
    """Validation right after a pre-training step judges a model that has not yet been a DEQ."""
    schedule = getattr(pl_module, "schedule", None)
    steps = getattr(schedule, "pretrain_steps", 0)
    trainer = getattr(pl_module, "_trainer", None)
    return trainer is not None and steps > 0 and trainer.global_step < steps
