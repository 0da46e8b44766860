"""The LightningModule every DEQ task builds on: it owns the DEQ bookkeeping.

A task subclass only says how a batch becomes a loss and metrics. This base decides, per step,
how the model's DEQ layers run (shallow unrolled pre-training, then DEQ mode; a jittered forward
budget; a Jacobian-regularised step), adds the Jacobian loss on the schedule of the thesis, logs
the solver's diagnostics (forward and backward steps and residuals, the Jacobian loss, the spectral
radius at validation) and keeps the latest residual traces for the convergence-plot callback.

Hyper-parameters are plain dicts and numbers (converted from Hydra's containers here), so a
checkpoint loads with ``torch.load(weights_only=True)`` and ``load_from_checkpoint`` needs nothing
but the file.
"""

from __future__ import annotations

import copy
import random
from contextlib import ExitStack
from typing import Any

import hydra
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_warn
from torch import Tensor, nn
from torchmetrics import MaxMetric, MinMetric

from deq_lightning.config import DEQSchedule, build_model, is_run_fraction, plain
from deq_lightning.deq import DEQ, DEQStats, deq_override
from deq_lightning.metrics.equilibrium import equilibrium_metrics
from deq_lightning.models.contract import ModelOutput

STAGES = ("train", "val", "test")


class NonFiniteTrainingError(RuntimeError):
    """Too many training steps in a row had a non-finite loss or gradient."""


class DEQTask(pl.LightningModule):
    """Base task: builds the model from its config and runs it under the DEQ schedule.

    Subclasses implement :meth:`step` (batch -> loss, log dict) and call :meth:`run_model`.
    """

    def __init__(
        self,
        model: dict,
        solver: dict | None = None,
        backward: dict | None = None,
        optimizer: dict | None = None,
        scheduler: dict | None = None,
        compile: bool = False,
        model_from_data: list[str] | None = None,
        nonfinite_patience: int = 5,
        **schedule: Any,
    ) -> None:
        super().__init__()
        model, solver, backward = plain(model), plain(solver), plain(backward)
        optimizer, scheduler = plain(optimizer), plain(scheduler)
        schedule = {k: plain(v) for k, v in schedule.items()}
        self.save_hyperparameters()
        # Subclass frames still hold Hydra containers; keep only plain values (weights_only load).
        clean = {k: plain(v) for k, v in self.hparams.items()}
        self.hparams.clear()
        self.hparams.update(clean)
        self._hparams_initial = copy.deepcopy(self._hparams)
        self.schedule = DEQSchedule.of(schedule)
        self.model: nn.Module | None = None
        if all(self.hparams.model.get(k) is not None for k in model_from_data or ()):
            self._build_model()
        self.convergence_traces: dict[str, Tensor] = {}
        # Residual quantiles per logged stage (``val``, or ``val/kitti`` for one of several
        # evaluation sets), created on first use; their states are not saved in checkpoints.
        self.equilibrium = nn.ModuleDict()
        # What "converged" meant in each stage's last solve: solver, tol, stop_mode, max_iter.
        self.solver_settings: dict[str, dict[str, Any]] = {}
        self._pending: DEQStats | None = None
        self._first_val_batch = False
        if nonfinite_patience < 0:
            raise ValueError(
                f"task.nonfinite_patience must be >= 0 (0: never stop), got {nonfinite_patience}"
            )
        # The non-finite guard (see on_before_optimizer_step): steps skipped in this run (kept
        # in checkpoints), the current streak, and what is needed to undo a bad step.
        self.nonfinite_steps = 0
        self._nonfinite_in_a_row = 0
        self._loss_finite: Tensor | None = None
        self._guard_batch: tuple[Any, int] = (None, -1)
        self._stats_backup: list[Tensor] | None = None

    def _build_model(self) -> None:
        hp = self.hparams
        model = build_model(hp.model, hp.solver, hp.backward)
        if hp.compile:
            compile_equilibrium_cells(model)
        self.model = model

    def configure_model(self) -> None:
        """Build the model once the data is set up when its config takes values from the data.

        ``model_from_data`` lists model arguments read from the DataModule (e.g. ``vocab_size``
        of a corpus); they are written into the hyper-parameters, so the checkpoint rebuilds the
        same model without the data.
        """
        if self.model is None:
            self.build_for(self.trainer.datamodule)

    def build_for(self, dm: Any) -> None:
        """Build the model (once), taking ``model_from_data`` values from the DataModule ``dm``."""
        if self.model is not None:
            return
        for key in self.hparams.model_from_data or ():
            if not hasattr(dm, key):
                raise AttributeError(
                    f"task.model_from_data asks for '{key}', which {type(dm).__name__} does not have"
                )
            self.hparams.model[key] = getattr(dm, key)
        self._hparams_initial = copy.deepcopy(self._hparams)
        self._build_model()

    # ------------------------------------------------------------------ running the model

    @property
    def pretraining(self) -> bool:
        """Whether this step is shallow unrolled pre-training (a fraction < 1 of the run is
        placed when fitting starts; outside a Trainer it means no pre-training)."""
        steps = self.schedule.pretrain_steps
        return self.training and not is_run_fraction(steps) and self.global_step < steps

    def on_fit_start(self) -> None:
        # The schedule's fraction-of-run points become step counts once the run's length is known.
        self.schedule = self.schedule.resolved(self.trainer.estimated_stepping_batches)

    def run_model(self, *args: Any, **kwargs: Any) -> ModelOutput:
        """Call the model under this step's DEQ settings; returns its :class:`ModelOutput`.

        Works without a Trainer too (a task loaded from a checkpoint in a notebook): eval mode
        then runs as a plain validation step, without the spectral radius.
        """
        stage = "train" if self.training else "eval"
        with ExitStack() as stack:
            changes = self._deq_changes()
            if changes:
                stack.enter_context(deq_override(self.model, **changes))
            out = model_output(self.model(*args, **kwargs))
        if out.stats is not None:
            self.convergence_traces[stage if stage == "train" else self._eval_stage()] = (
                out.stats.forward.rel_trace.float().mean(1).detach().cpu()
            )
            if self.training:
                self._pending = out.stats
        return out

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """The model's prediction alone (``run_model(...).output``)."""
        return self.run_model(*args, **kwargs).output

    def _eval_stage(self) -> str:
        return "test" if self._trainer is not None and self.trainer.testing else "val"

    def _deq_changes(self) -> dict:
        s = self.schedule
        changes: dict[str, Any] = {}
        if not self.training:
            if (
                s.spectral_radius_every
                and self._trainer is not None
                and self.trainer.validating
                and self.current_epoch % s.spectral_radius_every == 0
                and self._first_val_batch
            ):
                changes["compute_spectral_radius"] = True
            return changes
        if self.pretraining:
            changes.update(backward="unrolled", backward_opts={"steps": s.pretrain_unroll})
        if self._jac_weight_now() > 0 and random.random() < self._jac_prob():
            changes["compute_jac_loss"] = True
        if self._residual_on():
            changes["compute_residual_loss"] = True
        if s.max_iter_jitter and not self.pretraining:
            base = self._base_max_iter()
            if base is not None:
                changes["solver_opts"] = {
                    "max_iter": max(1, base - random.randint(0, s.max_iter_jitter))
                }
        return changes

    def _jac_prob(self) -> float:
        return (
            1.0
            if self.pretraining and self.schedule.pretrain_jac_loss_weight
            else (self.schedule.jac_loss_freq)
        )

    def _residual_on(self) -> bool:
        """Whether this training step adds the residual term: a weight is set, pre-training is
        over and ``residual_loss_start`` is reached (a fraction < 1 of the run is placed when
        fitting starts; outside a Trainer there is no run to place it in, so the term is off)."""
        s = self.schedule
        if s.residual_loss_weight <= 0 or self.pretraining:
            return False
        start = s.residual_loss_start
        return not is_run_fraction(start) and self.global_step >= start

    def _jac_weight_now(self) -> float:
        return self.schedule.jac_weight(self.global_step, self.current_epoch, self.pretraining)

    def _base_max_iter(self) -> int | None:
        for m in self.model.modules():
            if hasattr(m, "active_solver_opts"):
                return m.active_solver_opts()["max_iter"]
        return None

    def add_deq_losses(self, loss: Tensor, stats: DEQStats | None) -> Tensor:
        """``loss + gamma * jac_loss + residual_loss_weight * residual_loss``, each term when this
        step computed it."""
        if stats is not None and stats.jac_loss is not None:
            loss = loss + self._jac_weight_now() * stats.jac_loss
        if stats is not None and stats.residual_loss is not None:
            loss = loss + self.schedule.residual_loss_weight * stats.residual_loss
        return loss

    # ------------------------------------------------------------------ Lightning hooks

    def step(self, batch: Any, stage: str) -> Tensor:
        raise NotImplementedError("a task implements step(batch, stage) -> loss")

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        return self.step(batch, "train")

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._first_val_batch = batch_idx == 0
        self.step(batch, "val")

    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._first_val_batch = False
        self.step(batch, "test")

    def on_after_backward(self) -> None:
        stats, self._pending = self._pending, None
        if stats is not None and stats.backward is not None:
            self.log_train(solver_metrics(stats.backward, "train/bwd_"))

    def log_train(self, metrics: dict[str, Tensor], batch_size: int | None = None) -> None:
        """Training diagnostics under DDP: ``<key>_step`` is this process's batch value (rank 0's
        in the loggers: no collective per step); ``<key>_epoch`` is the mean over every rank's
        batches (one reduction per epoch)."""
        self.log_dict({f"{k}_step": v for k, v in metrics.items()}, on_step=True, on_epoch=False)
        self.log_dict(
            {f"{k}_epoch": v for k, v in metrics.items()},
            on_step=False,
            on_epoch=True,
            sync_dist=True,
            batch_size=batch_size,
        )

    def log_deq(
        self, stats: DEQStats | None, stage: str, batch_size: int, prefix: str | None = None
    ) -> None:
        """Forward diagnostics (and the Jacobian term / spectral radius when present).

        ``prefix`` replaces ``stage`` in the keys (e.g. ``val/kitti`` for one of several
        evaluation sets); the keys then carry no ``/dataloader_idx_N`` suffix.
        """
        if stats is None:
            return
        train = stage == "train"
        kw = dict(on_step=train, on_epoch=True, sync_dist=not train, batch_size=batch_size)
        if prefix is not None:
            kw["add_dataloader_idx"] = False
        stage = prefix or stage
        metrics = solver_metrics(stats.forward, f"{stage}/fwd_", per_sample=False)
        if train:
            self.log_train(metrics, batch_size)
            metrics = {}
        if stats.jac_loss is not None:
            # Only the steps that draw a Jacobian step have it (so it may be missing on some
            # ranks): in training, rank 0's value.
            metrics[f"{stage}/jac_loss"] = stats.jac_loss.detach()
        if stats.residual_loss is not None:
            metrics[f"{stage}/residual_loss"] = stats.residual_loss.detach()
        self.log_dict(metrics, **kw)
        self._log_equilibrium(stats, stage, prefix is not None)
        if train:
            self.log("train/pretraining", float(self.pretraining), on_step=True, on_epoch=False)
            self.log("train/jac_weight", self._jac_weight_now(), on_step=True, on_epoch=False)
        if stats.spectral_radius is not None:
            self.log(f"{stage}/spectral_radius", stats.spectral_radius.mean(), **kw)

    def _log_equilibrium(self, stats: DEQStats, stage: str, own_key: bool) -> None:
        """Per-sample, per-epoch health of the forward solves (see :func:`equilibrium_metrics`).

        Batch means hide a minority of samples far from their fixed point; the epoch's
        converged fraction and residual quantiles show them.
        """
        if stats.mode == "unrolled":
            return  # shallow pre-training (or an explicit unrolled net): no equilibrium to judge
        fwd = stats.forward
        key = health_key(stage)
        if key not in self.equilibrium:
            self.equilibrium[key] = equilibrium_metrics().to(fwd.residual.device)
        self.solver_settings[stage] = {
            "solver": fwd.solver,
            "tol": fwd.tol,
            "stop_mode": fwd.stop_mode,
            "max_iter": fwd.max_iter,
            "mode": stats.mode,
        }
        values = {
            "converged": fwd.converged.float(),
            "steps": fwd.steps.float(),
            "res_p50": fwd.residual,
            "res_p90": fwd.residual,
            "res_max": fwd.residual,
        }
        train = stage == "train"
        extra = {"add_dataloader_idx": False} if own_key else {}
        for name, metric in self.equilibrium[key].items():
            per_step = train and name in ("converged", "steps")
            if per_step:
                metric(values[name])  # forward: also the batch's value, for the step log
            else:
                metric.update(values[name])
            self.log(
                f"{stage}/fwd_{name}",
                metric,
                on_step=per_step,
                on_epoch=True,
                metric_attribute=f"equilibrium.{key}.{name}",
                **extra,
            )

    def equilibrium_stages(self, stage: str) -> list[str]:
        """The logged names of ``stage``'s solves: ``val``, or ``val/kitti``, ``val/sintel``..."""
        names = [k.removesuffix("__fwd").replace("__", "/") for k in self.equilibrium]
        return [n for n in names if n.split("/")[0] == stage]

    def equilibrium_summary(self, stage: str) -> dict[str, Any] | None:
        """The epoch-so-far health of ``stage``'s solves (all processes) and what "converged"
        meant there; ``None`` when the stage ran no DEQ. Call it on every process (it syncs)."""
        key = health_key(stage)
        if key not in self.equilibrium or not self.equilibrium[key]["converged"].update_called:
            return None
        out = {name: float(m.compute()) for name, m in self.equilibrium[key].items()}
        return {**out, **self.solver_settings.get(stage, {})}

    # ------------------------------------------------------------------ non-finite guard
    #
    # A NaN/Inf loss or gradient (bad data, a diverging solve) must never reach the weights: the
    # step's gradients are dropped (the optimizer then leaves every parameter alone), batch-norm
    # statistics the forward pass updated are restored, and after ``nonfinite_patience`` such
    # steps in a row the run stops (its last checkpoint still holds finite weights).

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._guard_batch = (batch, batch_idx)
        self._loss_finite = None
        stats = norm_statistics(self)
        if stats:
            if self._stats_backup is None or len(self._stats_backup) != len(stats):
                self._stats_backup = [t.detach().clone() for t in stats]
            else:
                torch._foreach_copy_(self._stats_backup, [t.detach() for t in stats])

    def on_before_backward(self, loss: Tensor) -> None:
        ok = torch.isfinite(loss.detach()).all()
        self._loss_finite = ok if self._loss_finite is None else self._loss_finite & ok

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        ok = torch.ones((), dtype=torch.bool, device=self.device)
        if self._loss_finite is not None:
            ok = ok & self._loss_finite.to(ok.device)
        # Under a gradient scaler (16-bit AMP) inf gradients are routine: the scaler skips them.
        if grads and getattr(self.trainer.precision_plugin, "scaler", None) is None:
            norms = torch._foreach_norm(grads)
            ok = ok & torch.isfinite(torch.stack([n.float() for n in norms])).all().to(ok.device)
        bad = self.trainer.strategy.reduce_boolean_decision(not bool(ok), all=False)
        self._loss_finite = None
        if not bad:
            self._nonfinite_in_a_row = 0
            return
        for g in optimizer.param_groups:
            for p in g["params"]:
                p.grad = None  # the optimizer skips parameters without a gradient
        stats = norm_statistics(self)
        if self._stats_backup is not None and len(stats) == len(self._stats_backup):
            torch._foreach_copy_([t.data for t in stats], self._stats_backup)
        self.nonfinite_steps += 1
        self._nonfinite_in_a_row += 1
        where = self.describe_batch()
        limit = self.hparams.get("nonfinite_patience", 5)
        msg = (
            f"non-finite loss or gradient at step {self.global_step} (epoch {self.current_epoch}, "
            f"{where}): optimizer step skipped ({self._nonfinite_in_a_row} in a row, "
            f"{self.nonfinite_steps} in this run; train/nonfinite_steps)"
        )
        if limit and self._nonfinite_in_a_row >= limit:
            raise NonFiniteTrainingError(
                f"{msg}. Stopping: {limit} non-finite steps in a row (task.nonfinite_patience). "
                "The weights are those before them (finite). Likely causes: NaN/Inf in the "
                "inputs or targets (data.check_finite=true refuses them at load), a learning "
                "rate too high (task.optimizer.lr), a solve that diverges (solver.max_iter, "
                "task.jac_loss_weight)."
            )
        rank_zero_warn(msg)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._guard_batch = (None, -1)  # no reference to the batch beyond its step
        # The run's count so far, logged on every step (0 in a healthy run).
        self.log("train/nonfinite_steps", float(self.nonfinite_steps), on_step=True, on_epoch=False)

    def describe_batch(self) -> str:
        """The current training batch for a message: its index, the samples holding NaN/Inf,
        and their dataset indices or files where the batch carries them."""
        batch, batch_idx = getattr(self, "_guard_batch", (None, -1))
        parts = [f"batch {batch_idx}"]
        bad = nonfinite_samples(batch)
        if bad:
            parts.append(f"non-finite inputs in samples {bad[:10]} of the batch")
        index = batch.get("index") if isinstance(batch, dict) else None
        if isinstance(index, Tensor) and index.dim() == 1:
            ids = [int(index[i]) for i in (bad or range(len(index)))[:10]]
            names = getattr(getattr(self.trainer, "datamodule", None), "sample_names", None)
            parts.append(f"files {names(ids)}" if names else f"dataset indices {ids}")
        return ", ".join(parts)

    # ------------------------------------------------------------------ optimisation

    def configure_optimizers(self) -> Any:
        opt_cfg = dict(self.hparams.optimizer or {"_target_": "torch.optim.Adam", "lr": 1e-3})
        optimizer = hydra.utils.instantiate(opt_cfg, params=self.trainer.model.parameters())
        sched_cfg = self.hparams.scheduler
        if not sched_cfg:
            return optimizer
        sched_cfg = dict(sched_cfg)
        interval = sched_cfg.pop("interval", "step")
        scheduler = build_scheduler(
            sched_cfg, optimizer, int(self.trainer.estimated_stepping_batches)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": interval},
        }

    def lr_scheduler_step(self, scheduler: Any, metric: Any) -> None:
        # timm schedulers are driven by the update count, not by a bare .step().
        if hasattr(scheduler, "step_update"):
            scheduler.step_update(num_updates=self.global_step)
        else:
            scheduler.step()

    # ------------------------------------------------------------------ resuming

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the running metric bests (``val/acc_best``: torchmetrics Max/MinMetric, whose
        states are not in ``state_dict``), so that a resumed run continues them. The DEQ schedule
        (pre-training switch, Jacobian weight) needs nothing: it follows from the step and epoch
        counters Lightning restores."""
        checkpoint["nonfinite_steps"] = self.nonfinite_steps
        checkpoint["metric_bests"] = {
            name: next(iter(m.metric_state.values())).detach().cpu()
            for name, m in self.named_modules()
            if isinstance(m, MaxMetric | MinMetric) and m.update_called
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self.nonfinite_steps = int(checkpoint.get("nonfinite_steps", 0))
        for name, value in checkpoint.get("metric_bests", {}).items():
            metric = self.get_submodule(name)
            metric.reset()
            metric.update(value.to(metric.device))


def model_output(out: Any) -> ModelOutput:
    """A model's return value as :class:`ModelOutput` (the contract of
    :mod:`deq_lightning.models`); anything else is an output without stats."""
    return out if isinstance(out, ModelOutput) else ModelOutput(out)


def compile_equilibrium_cells(model: nn.Module) -> list[nn.Module]:
    """``task.compile=true``: compile, in place, the weight-tied module each DEQ's f applies
    (named by the model class's ``equilibrium_cell``), where a DEQ spends its time.

    In place (``nn.Module.compile``), so checkpoints keep their keys and load with or without
    compilation; ``dynamic`` because batch compaction changes the batch between solver steps.
    The solver loop itself stays eager (data-dependent stopping). A model without a cell (an
    explicit baseline, a layered twin) is compiled whole the same way.
    """
    cells = [
        getattr(m, type(m).equilibrium_cell)
        for m in model.modules()
        if getattr(type(m), "equilibrium_cell", None) and getattr(m, "deq", None) is not None
    ]
    # The Jacobian term and the implicit backward differentiate f's graph more than once
    # (create_graph / retain_graph), which compiled backwards with donated buffers refuse.
    torch._functorch.config.donated_buffer = False
    for cell in cells or [model]:
        cell.compile(dynamic=True)
    for deq in model.modules():
        if isinstance(deq, DEQ):
            deq.eager_jacobian = True
    return cells or [model]


def norm_statistics(module: nn.Module) -> list[Tensor]:
    """Running statistics of the normalisation layers: a forward pass updates them, so a
    batch with NaN inputs corrupts them even when its optimizer step is skipped."""
    out = []
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats:
            out += [t for t in (m.running_mean, m.running_var) if t is not None]
    return out


def nonfinite_samples(batch: Any) -> list[int]:
    """Positions in ``batch`` (a tensor, tuple/list or dict of tensors, first dimension = the
    samples) of the samples whose floating-point tensors hold NaN or Inf."""
    tensors = batch.values() if isinstance(batch, dict) else batch
    if isinstance(tensors, Tensor):
        tensors = [tensors]
    if not isinstance(tensors, list | tuple) and not isinstance(batch, dict):
        return []
    bad: set[int] = set()
    for t in tensors:
        if isinstance(t, Tensor) and t.is_floating_point() and t.dim() > 0:
            rows = ~torch.isfinite(t.detach().reshape(len(t), -1)).all(1)
            bad.update(rows.nonzero().flatten().tolist())
    return sorted(bad)


def health_key(stage: str) -> str:
    """A ModuleDict key for a logged stage name (``val/kitti`` -> ``val__kitti__fwd``; bare
    ``train`` would shadow ``nn.Module.train``)."""
    return stage.replace("/", "__") + "__fwd"


def solver_metrics(stats: Any, prefix: str, per_sample: bool = True) -> dict[str, Tensor]:
    """Batch means of a solve's diagnostics as tensors (no host sync per step).

    ``nstep`` is the iteration of the returned (lowest-residual) iterate, ``steps`` the
    evaluations of f actually run: a solver that oscillates shows a small ``nstep`` beside a
    ``steps`` at the budget. ``per_sample=False`` leaves out ``steps`` and ``converged``, which
    the task logs per sample over the epoch (:meth:`DEQTask._log_equilibrium`).
    """
    out = {
        f"{prefix}nstep": stats.nstep.float().mean(),
        f"{prefix}abs_res": stats.abs_res.float().mean(),
        f"{prefix}rel_res": stats.rel_res.float().mean(),
    }
    if per_sample:
        out[f"{prefix}steps"] = stats.steps.float().mean()
        out[f"{prefix}converged"] = stats.converged.float().mean()
    return out


def build_scheduler(cfg: dict, optimizer: torch.optim.Optimizer, total: int) -> Any:
    """A warm-up + cosine (or other timm) schedule over ``total`` optimizer steps.

    ``cfg`` is ``{"name": "cosine", "warmup": 0.05, "min_lr_ratio": 0.0}`` (warm-up as a fraction of
    the run or an absolute count), ``{"name": "onecycle", ...}`` (see :func:`one_cycle`) or any
    ``_target_`` scheduler config.
    """
    if "_target_" in cfg:
        return hydra.utils.instantiate(cfg, optimizer=optimizer)
    if cfg.get("name") == "onecycle":
        return one_cycle(cfg, optimizer, total)
    from timm.scheduler import create_scheduler_v2

    name = cfg.get("name", "cosine")
    warmup = cfg.get("warmup", 0.0)
    warmup_steps = int(warmup * total) if is_run_fraction(warmup) else int(warmup)
    base_lr = optimizer.param_groups[0]["lr"]
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=name,
        num_epochs=max(1, total),
        warmup_epochs=warmup_steps,
        warmup_lr=cfg.get("warmup_lr_ratio", 0.0) * base_lr or base_lr * 1e-3,
        min_lr=cfg.get("min_lr_ratio", 0.0) * base_lr,
        step_on_epochs=False,
        updates_per_epoch=1,
    )
    return scheduler


def one_cycle(cfg: dict, optimizer: torch.optim.Optimizer, total: int) -> Any:
    """RAFT's and DEQ-Flow's schedule: a linear warm-up over ``warmup`` of the run (``pct_start``,
    0.05 in the thesis) to the optimizer's lr, then a linear anneal, no momentum cycling.

    ``total`` gets one spare step: OneCycleLR refuses a step past its end, and Lightning steps the
    scheduler once more than the optimizer in runs that stop at ``max_steps``.
    """
    warmup = float(cfg.get("warmup", 0.05))
    if not 0.0 < warmup < 1.0:
        raise ValueError(f"task.scheduler.warmup is OneCycle's pct_start, in (0, 1); got {warmup}")
    return torch.optim.lr_scheduler.OneCycleLR(
        optimizer,
        max_lr=[g["lr"] for g in optimizer.param_groups],
        total_steps=max(1, total) + 1,
        pct_start=warmup,
        anneal_strategy=cfg.get("anneal", "linear"),
        cycle_momentum=False,
    )
