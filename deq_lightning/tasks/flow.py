"""Optical flow (DEQ-Flow on FlyingChairs, FlyingThings3D, Sintel, KITTI, HD1K or the embedded
synthetic pairs).

Training minimises the sparse fixed-point correction loss over the ``model.n_states`` states the
DEQ returns (:func:`~deq_lightning.models.deq_flow.fixed_point_correction_loss`); phantom or
implicit gradients come from the ``backward`` config group, the larger test budget from
``solver.eval_opts``.

Evaluation follows the benchmarks (see :mod:`deq_lightning.metrics.flow`): dense sets pool EPE
and the 1/3/5px rates over all pixels; sparse sets (KITTI, HD1K) average EPE per image over
valid pixels and report F1-all. Each evaluation set keeps torchmetrics sums that are added over
DDP ranks before dividing, and the zero-flow prediction is scored beside the model
(``*/epe_zero``), the baseline any flow must beat.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from deq_lightning.metrics.flow import FlowMetric, epe_map
from deq_lightning.models.contract import ModelOutput
from deq_lightning.models.deq_flow import MAX_FLOW, fixed_point_correction_loss, forward_interpolate

from .base import DEQTask

SPARSE_SETS = ("kitti", "hd1k")  # benchmarks with sparse ground truth: KITTI's definitions


def resolve_init_checkpoint(path: str | Path) -> Path:
    """``task.init_from``: a ``.ckpt`` file, or a run directory (its ``checkpoints/last.ckpt``,
    the previous stage's final weights, as the thesis starts each stage)."""
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / "checkpoints" / "last.ckpt"
    if not p.is_file():
        raise FileNotFoundError(
            f"task.init_from={path}: no checkpoint at {p}; give a .ckpt file or the run directory "
            "of the previous stage (one with checkpoints/last.ckpt)"
        )
    return p


def finite_ground_truth(flow: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """NaN/Inf ground-truth pixels become invalid (and 0), so that a masked loss stays finite
    (``0 * NaN`` is NaN). The flow DataModules already do this; batches from elsewhere may not."""
    finite = torch.isfinite(flow).all(1)
    return torch.where(finite[:, None], flow, 0.0), valid * finite


class FlowTask(DEQTask):
    """Flow on ``{"image1", "image2", "flow", "valid"}`` batches.

    ``gamma`` weighs the trajectory states of the correction loss (0.8; 0.9 for the Sintel and
    KITTI stages), ``max_flow`` drops pixels with longer true flow from the loss. ``freeze_bn``
    keeps the context encoder's batch-norm statistics fixed (the thesis does after Chairs).
    ``init_from`` loads the weights of a previous stage when training starts (not on a resume);
    ``require_init`` makes it mandatory for fitting (the later thesis stages).
    ``pad_mode`` is how evaluation frames are padded to a multiple of 8 (``kitti``: bottom only);
    ``warm_start`` lets benchmark prediction reuse fixed points along sequences.
    ``train_seed`` reseeds torch's global generator when training starts: the embedded set draws
    its training pairs from it, so every model (whose initialisation consumes a different amount
    of randomness) then sees the same pairs; ``train/data_checksum`` (the running sum of the
    training flows' magnitudes) lets two runs check that they did.

    Metrics: ``{stage}/epe``, ``/1px``, ``/3px``, ``/5px`` (percent of pixels below), ``/epe_zero``
    and, for sparse sets, ``/f1_all`` (percent), with ``{stage}/<set>/...`` per set when the
    DataModule names several (``{stage}/epe`` is then the first set's, the one checkpoints watch).
    The first pairs of each evaluation epoch are kept in ``flow_examples`` for the image callback.
    """

    def __init__(
        self,
        gamma: float = 0.8,
        max_flow: float = MAX_FLOW,
        freeze_bn: bool = False,
        init_from: str | None = None,
        require_init: bool = False,
        pad_mode: str = "sintel",
        warm_start: bool = True,
        examples: int = 4,
        train_seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if not 0 < gamma <= 1:
            raise ValueError(f"task.gamma must be in (0, 1], got {gamma}")
        if max_flow <= 0:
            raise ValueError(f"task.max_flow must be > 0, got {max_flow}")
        if pad_mode not in ("sintel", "kitti"):
            raise ValueError(f"task.pad_mode must be 'sintel' or 'kitti', got {pad_mode!r}")
        self.gamma, self.max_flow, self.pad_mode = gamma, max_flow, pad_mode
        self.freeze_bn, self.init_from, self.examples = freeze_bn, init_from, examples
        self.require_init, self.warm_start = require_init, warm_start
        self.train_seed = train_seed
        self._data_checksum = 0.0
        self._previous: Tensor | None = None
        self.set_names: list[str] = []
        self.flow_metrics = self.make_metrics(["default"])
        self.flow_examples: dict[str, tuple[Tensor, Tensor, Tensor, Tensor]] = {}
        self._keep_example = False

    # ------------------------------------------------------------------ setup

    def _build_model(self) -> None:
        # Also runs inside DEQTask.__init__, where the saved hyper-parameters are already set.
        super()._build_model()
        if self.hparams.get("freeze_bn"):
            self.model.freeze_bn()

    def make_metrics(self, names: list[str]) -> torch.nn.ModuleDict:
        """One metric per (stage, set) for the model and one for the zero flow."""
        self.set_names = list(names)
        return torch.nn.ModuleDict(
            {
                f"{stage}_{what}_{i}": FlowMetric()
                for stage in ("val", "test")
                for what in ("model", "zero")
                for i in range(len(names))
            }
        )

    def setup(self, stage: str) -> None:
        # Called before Lightning moves the module to its device, so new metrics move with it.
        names = getattr(getattr(self.trainer, "datamodule", None), "val_names", None)
        if names and list(names) != self.set_names:
            self.flow_metrics = self.make_metrics(list(names))
        if stage != "fit" or self.trainer.ckpt_path is not None:
            return
        if self.init_from:
            self.load_stage_weights(self.init_from)
        elif self.require_init:
            raise ValueError(
                "this stage starts from the previous stage's weights: set "
                "task.init_from=<its run dir or .ckpt> (or task.require_init=false to train "
                "from scratch)"
            )

    def load_stage_weights(self, path: str | Path) -> None:
        """The model weights of a previous stage's checkpoint (no optimizer or step state)."""
        ckpt = resolve_init_checkpoint(path)
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        model_state = {k[len("model.") :]: v for k, v in state.items() if k.startswith("model.")}
        hint = "stages must use the same model (size, hidden_dim, corr_levels)"
        try:
            missing, unexpected = self.model.load_state_dict(model_state, strict=False)
        except RuntimeError as e:  # shapes differ
            first = str(e).strip().splitlines()[1:2]
            raise ValueError(
                f"task.init_from={path}: {ckpt} does not fit: {first}; {hint}"
            ) from None
        if missing or unexpected:
            raise ValueError(
                f"task.init_from={path}: {ckpt} does not fit this model (missing "
                f"{missing[:5]}, unexpected {unexpected[:5]}); {hint}"
            )

    # ------------------------------------------------------------------ steps

    def loss(self, flow_preds: list[Tensor], flow: Tensor, valid: Tensor) -> Tensor:
        flow, valid = finite_ground_truth(flow, valid)
        return fixed_point_correction_loss(flow_preds, flow, valid, self.gamma, self.max_flow)

    def step(self, batch: dict, stage: str, set_index: int = 0) -> Tensor:
        img1, img2, flow, valid = batch["image1"], batch["image2"], batch["flow"], batch["valid"]
        n = img1.shape[0]
        pad = {} if stage == "train" else {"pad_mode": self.pad_mode}
        out, stats = self.run_model(img1, img2, **pad)
        loss = self.loss(out["flow_preds"], flow, valid)
        multi = stage != "train" and len(self.set_names) > 1
        prefix = f"{stage}/{self.set_names[set_index]}" if multi else stage
        log_kw = dict(on_epoch=True, batch_size=n, add_dataloader_idx=False)
        if stage == "train":
            with torch.no_grad():
                flow, valid = finite_ground_truth(flow, valid)
                mask = valid >= 0.5
                epe = epe_map(out["flow"], flow)[mask].mean() if mask.any() else loss * 0
            self.log("train/loss", loss.detach(), on_step=True, prog_bar=True, **log_kw)
            self.log("train/epe", epe, on_step=True, **log_kw)
        else:
            self.log(f"{prefix}/loss", loss, sync_dist=True, **log_kw)
            self.update_metrics(stage, set_index, out["flow"].detach(), flow, valid)
            if self._keep_example and set_index == 0:
                k = self.examples
                self.flow_examples[stage] = tuple(
                    t[:k].detach().float().cpu() for t in (img1, out["flow"], flow, valid)
                )
        self.log_deq(stats, stage, n, prefix=prefix if multi else None)
        return self.add_deq_losses(loss, stats)

    def update_metrics(
        self, stage: str, set_index: int, pred: Tensor, flow: Tensor, valid: Tensor
    ) -> None:
        # Dense benchmarks count every pixel; sparse ones only the valid ground truth.
        mask = valid if self.is_sparse(set_index) else None
        self.flow_metrics[f"{stage}_model_{set_index}"].update(pred, flow, mask)
        self.flow_metrics[f"{stage}_zero_{set_index}"].update(torch.zeros_like(flow), flow, mask)

    def is_sparse(self, set_index: int) -> bool:
        return self.set_names[set_index] in SPARSE_SETS

    def on_train_start(self) -> None:
        if self.train_seed is not None:
            torch.manual_seed(self.train_seed)

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        self._data_checksum += float(batch["flow"].double().abs().sum())
        self.log("train/data_checksum", self._data_checksum, on_step=True, on_epoch=False)
        return self.step(batch, "train")

    def validation_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._first_val_batch = batch_idx == 0 and dataloader_idx == 0
        self._keep_example = batch_idx == 0
        self.step(batch, "val", dataloader_idx)

    def test_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._first_val_batch = False
        self._keep_example = batch_idx == 0
        self.step(batch, "test", dataloader_idx)

    # ------------------------------------------------------------------ epoch ends

    def on_validation_epoch_end(self) -> None:
        self.log_scores("val")

    def on_test_epoch_end(self) -> None:
        self.log_scores("test")

    def log_scores(self, stage: str) -> None:
        """Every set's ratios (sums of all ranks, so identical on each: ``max`` keeps them)."""
        values: dict[str, Tensor] = {}
        for i, name in enumerate(self.set_names):
            model_metric = self.flow_metrics[f"{stage}_model_{i}"]
            zero_metric = self.flow_metrics[f"{stage}_zero_{i}"]
            if not model_metric.update_called:
                continue
            scores, zero = model_metric.compute(), zero_metric.compute()
            model_metric.reset()
            zero_metric.reset()
            sparse = self.is_sparse(i)
            epe_key = "image_epe" if sparse else "epe"  # KITTI: per-image mean, then over images
            set_values = {
                "epe": scores[epe_key],
                "epe_zero": zero[epe_key],
                "1px": scores["1px"],
                "3px": scores["3px"],
                "5px": scores["5px"],
            }
            if sparse:
                set_values["f1_all"] = scores["f1_all"]
            prefix = f"{stage}/{name}" if len(self.set_names) > 1 else stage
            values.update({f"{prefix}/{k}": v.float() for k, v in set_values.items()})
            if i == 0 and len(self.set_names) > 1:
                values[f"{stage}/epe"] = scores[epe_key].float()
                values[f"{stage}/epe_zero"] = zero[epe_key].float()
        if values:
            self.log_dict(values, sync_dist=True, reduce_fx="max", add_dataloader_idx=False)

    # ------------------------------------------------------------------ prediction

    def solve(self, img1: Tensor, img2: Tensor, flow_init: Tensor | None = None) -> ModelOutput:
        """The model on a pair of evaluation frames (``(B, 3, H, W)`` in [0, 255]), padded as
        ``pad_mode`` says; ``flow_init``: a warm start at 1/8 of the padded size."""
        return self.run_model(img1, img2, flow_init=flow_init, pad_mode=self.pad_mode)

    def forward(self, img1: Tensor, img2: Tensor, flow_init: Tensor | None = None) -> Tensor:
        """The final flow ``(B, 2, H, W)`` of a frame pair (the last iterate, at input size)."""
        out, _ = self.solve(img1, img2, flow_init)
        return out["flow"]

    def predict_step(self, batch: dict, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """``{"image1", "image2", "name", "new_sequence"}`` -> ``{"names", "flow"}`` (CPU).

        With ``warm_start`` and one pair per batch, a pair that continues a sequence (Sintel)
        starts from the previous fixed point carried forward by its flow, as the thesis's
        Sintel submission does.
        """
        img1, img2 = batch["image1"], batch["image2"]
        prev = self._previous
        continues = "new_sequence" in batch and not bool(batch["new_sequence"][0])
        coarse = (-(-img1.shape[-2] // 8), -(-img1.shape[-1] // 8))  # the padded 1/8 size
        # Consecutive pairs only reach one rank when there is one rank.
        one_rank = self._trainer is None or self.trainer.world_size == 1
        warm = self.warm_start and continues and one_rank and img1.shape[0] == 1
        warm = warm and prev is not None
        init = forward_interpolate(prev) if warm and prev.shape[-2:] == coarse else None
        out, _ = self.solve(img1, img2, init)
        self._previous = out["flow_low"]
        return {"names": list(batch.get("name", [])), "flow": out["flow"].float().cpu()}
