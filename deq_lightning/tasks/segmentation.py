"""Semantic segmentation (MDEQ on Cityscapes, or on the embedded synthetic digit scenes).

The model returns logits at the resolution of its highest stream (1/4 of the input for the
thesis models); they are upsampled (bilinear) to the label size before the loss and the metrics,
so that everything is measured at full label resolution, as in the thesis.

Metrics come from one confusion matrix per evaluation stage (torchmetrics, summed over DDP ranks;
the DataModules' evaluation loaders give every image to exactly one rank, so the sum is exact).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassConfusionMatrix

from .base import DEQTask

IGNORE_INDEX = 255


def upsample(logits: Tensor, size: Sequence[int]) -> Tensor:
    """Logits to the label size (bilinear); unchanged when already there."""
    if tuple(logits.shape[-2:]) == tuple(size):
        return logits
    return F.interpolate(logits, size=tuple(size), mode="bilinear", align_corners=False)


def ohem_cross_entropy(
    logits: Tensor,
    target: Tensor,
    weight: Tensor | None,
    ignore_index: int,
    thresh: float,
    min_kept: int,
) -> Tensor:
    """Online hard example mining: the mean loss over the pixels the model is least sure of.

    A pixel is kept when its predicted probability of the true class is at most
    ``max(thresh, p_k)``, ``p_k`` being the ``min_kept``-th smallest such probability: at least
    ``min_kept`` pixels, more when many are below ``thresh`` (thesis: ``OHEMTHRES`` 0.9,
    ``OHEMKEEP`` 131072; reference ``lib/core/seg_criterion.py``).
    """
    pixel_loss = F.cross_entropy(
        logits, target, weight=weight, ignore_index=ignore_index, reduction="none"
    ).flatten()
    valid = target.flatten() != ignore_index
    if not valid.any():
        return logits.sum() * 0.0
    with torch.no_grad():
        safe = target.masked_fill(target == ignore_index, 0)
        prob = logits.softmax(1).gather(1, safe.unsqueeze(1)).flatten()[valid]
        k = min(max(min_kept, 1), prob.numel())
        threshold = max(prob.kthvalue(k).values.item(), thresh)
    return pixel_loss[valid][prob <= threshold].mean()


def segmentation_scores(confmat: Tensor) -> dict[str, Tensor]:
    """IoU per class, mIoU, pixel accuracy and mean class accuracy from a confusion matrix.

    ``confmat[t, p]`` counts pixels of true class ``t`` predicted as ``p`` (ignored pixels are not
    in it). A class that is neither in the labels nor in the predictions has IoU ``nan`` and is
    left out of the mean (on Cityscapes val every class is present, so this is the thesis's mIoU);
    likewise for its accuracy when it is not in the labels.
    """
    confmat = confmat.double()
    tp = confmat.diag()
    true, pred = confmat.sum(1), confmat.sum(0)
    union = true + pred - tp
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, float("nan")))
    acc = torch.where(true > 0, tp / true.clamp_min(1), torch.full_like(tp, float("nan")))
    total = confmat.sum()
    return {
        "iou": iou.float(),
        "miou": iou.nanmean().float(),
        "pixel_acc": (tp.sum() / total if total > 0 else total.new_tensor(float("nan"))).float(),
        "mean_acc": acc.nanmean().float(),
    }


@torch.no_grad()
def predict_probs(
    logits_fn: Callable[[Tensor], Tensor],
    images: Tensor,
    size: Sequence[int],
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
) -> Tensor:
    """Class probabilities at ``size``, averaged over input ``scales`` and horizontal flips.

    Each view is the whole image resized by a scale (bilinear), and mirrored when ``flip``; its
    logits are brought back to ``size`` (and un-mirrored) and turned into probabilities, which
    are averaged. (The reference sums ``exp(logits)`` over flips and slides a crop window over
    large scales; whole-image views and averaged probabilities keep every view on one scale.)
    """
    h, w = images.shape[-2:]
    total, n = None, 0
    for s in scales:
        x = images
        if s != 1.0:
            x = F.interpolate(
                images,
                size=(max(1, round(h * s)), max(1, round(w * s))),
                mode="bilinear",
                align_corners=False,
            )
        for mirrored in (False, True) if flip else (False,):
            view = x.flip(-1) if mirrored else x
            probs = upsample(logits_fn(view), size).float().softmax(1)
            total = (probs.flip(-1) if mirrored else probs) + (0 if total is None else total)
            n += 1
    return total / n


class SegmentationTask(DEQTask):
    """Per-pixel cross entropy on ``(images, labels)`` batches (``255`` = ignored).

    ``class_weights`` weight the loss per class (the Cityscapes configs use HRNet's weights,
    as the thesis does); ``ohem`` switches to online hard example mining. Validation runs one
    full-resolution pass; test averages ``test_scales`` x (``test_flip``) views.

    Metrics: ``{train,val,test}/loss``, ``{val,test}/miou``, ``.../pixel_acc``, ``.../mean_acc``
    (all in [0, 1]) and ``test/iou_<class name>``. The first images of each evaluation epoch,
    with predicted and true masks, are kept in ``mask_examples`` for the mask-logging callback.
    """

    def __init__(
        self,
        num_classes: int,
        class_names: Sequence[str] | None = None,
        class_weights: Sequence[float] | None = None,
        ignore_index: int = IGNORE_INDEX,
        ohem: bool = False,
        ohem_thresh: float = 0.9,
        ohem_min_kept: int = 131072,
        test_scales: Sequence[float] = (1.0,),
        test_flip: bool = False,
        examples: int = 4,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if num_classes < 2:
            raise ValueError(f"task.num_classes must be >= 2, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(
                f"task.class_names has {len(class_names)} names for {num_classes} classes"
            )
        if class_weights is not None and (
            len(class_weights) != num_classes or min(class_weights) <= 0
        ):
            raise ValueError(
                f"task.class_weights needs {num_classes} positive numbers, got "
                f"{list(class_weights)}; or null for an unweighted loss"
            )
        if not test_scales or min(test_scales) <= 0:
            raise ValueError(f"task.test_scales must be positive numbers, got {test_scales}")
        if not 0 < ohem_thresh <= 1 or ohem_min_kept < 1:
            raise ValueError(
                "task.ohem_thresh must be in (0, 1] and task.ohem_min_kept >= 1, got "
                f"{ohem_thresh} and {ohem_min_kept}"
            )
        self.num_classes = num_classes
        self.class_names = list(class_names or (f"class_{i}" for i in range(num_classes)))
        self.ignore_index = ignore_index
        self.ohem, self.ohem_thresh, self.ohem_min_kept = ohem, ohem_thresh, ohem_min_kept
        self.test_scales, self.test_flip = [float(s) for s in test_scales], test_flip
        self.examples = examples
        weight = None if class_weights is None else torch.tensor(class_weights, dtype=torch.float)
        self.register_buffer("class_weight", weight, persistent=False)
        self.losses = torch.nn.ModuleDict(
            {f"{s}_loss": MeanMetric() for s in ("train", "val", "test")}
        )
        self.confmats = torch.nn.ModuleDict(
            {
                f"{s}_confmat": MulticlassConfusionMatrix(
                    num_classes, ignore_index=ignore_index, validate_args=False
                )
                for s in ("val", "test")
            }
        )
        self.mask_examples: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        self._keep_example = False

    def setup(self, stage: str) -> None:
        # Class names for the per-class IoU keys: the config's, else the DataModule's.
        if self.hparams.class_names is None:
            names = getattr(getattr(self.trainer, "datamodule", None), "class_names", None)
            if names is not None and len(names) == self.num_classes:
                self.class_names = list(names)

    # ------------------------------------------------------------------ loss and inference

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        if not (target != self.ignore_index).any():  # e.g. a crop of void only: no signal
            return logits.sum() * 0.0
        logits = upsample(logits, target.shape[-2:])
        if self.ohem:
            return ohem_cross_entropy(
                logits,
                target,
                self.class_weight,
                self.ignore_index,
                self.ohem_thresh,
                self.ohem_min_kept,
            )
        return F.cross_entropy(
            logits, target, weight=self.class_weight, ignore_index=self.ignore_index
        )

    def forward(self, images: Tensor) -> Tensor:
        """Class logits ``(B, C, H, W)`` at the input's size (the model's are coarser)."""
        logits, _ = self.run_model(images)
        return upsample(logits, images.shape[-2:])

    def predict_probs(
        self, images: Tensor, size: Sequence[int], scales: Sequence[float], flip: bool
    ) -> tuple[Tensor, Any]:
        """:func:`predict_probs` through the task's DEQ settings; also the first view's stats."""
        seen: list[Any] = []

        def logits_fn(x: Tensor) -> Tensor:
            logits, stats = self.run_model(x)
            seen.append(stats)
            return logits

        return predict_probs(logits_fn, images, size, scales, flip), seen[0]

    # ------------------------------------------------------------------ steps

    def step(self, batch: Any, stage: str) -> Tensor:
        x, y = batch
        n = x.shape[0]
        if stage == "train":
            logits, stats = self.run_model(x)
            loss = self.loss(logits, y)
            self.log("train/loss_step", loss.detach(), on_step=True, on_epoch=False)
        else:
            scales, flip = (
                (self.test_scales, self.test_flip) if stage == "test" else ((1.0,), False)
            )
            probs, stats = self.predict_probs(x, y.shape[-2:], scales, flip)
            loss = F.nll_loss(
                probs.clamp_min(1e-12).log(),
                y,
                weight=self.class_weight,
                ignore_index=self.ignore_index,
            )
            pred = probs.argmax(1)
            self.confmats[f"{stage}_confmat"].update(pred, y)
            if self._keep_example:
                k = self.examples
                self.mask_examples[stage] = (x[:k].cpu(), pred[:k].cpu(), y[:k].cpu())
        if (y != self.ignore_index).any():
            self.losses[f"{stage}_loss"].update(loss.detach(), n)
        self.log(
            f"{stage}/loss",
            self.losses[f"{stage}_loss"],
            on_step=False,
            on_epoch=True,
            prog_bar=True,
        )
        self.log_deq(stats, stage, n)
        return self.add_deq_losses(loss, stats)

    def on_validation_batch_start(
        self, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._keep_example = batch_idx == 0

    def on_test_batch_start(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._keep_example = batch_idx == 0

    def on_validation_epoch_end(self) -> None:
        self.log_scores("val")

    def on_test_epoch_end(self) -> None:
        self.log_scores("test", per_class=True)

    def log_scores(self, stage: str, per_class: bool = False) -> None:
        # compute() sums the confusion matrices of all ranks, so every rank holds the same
        # numbers; reduce_fx="max" keeps them exact where Lightning asks for a reduction.
        scores = segmentation_scores(self.confmats[f"{stage}_confmat"].compute())
        self.confmats[f"{stage}_confmat"].reset()
        values = {f"{stage}/{k}": scores[k] for k in ("pixel_acc", "mean_acc")}
        if per_class:
            for name, v in zip(self.class_names, scores["iou"]):
                values[f"{stage}/iou_{name.replace(' ', '_')}"] = v
        self.log_dict(values, sync_dist=True, reduce_fx="max")
        self.log(f"{stage}/miou", scores["miou"], sync_dist=True, reduce_fx="max", prog_bar=True)

    def predict_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> dict:
        """``(images, names)`` -> ``{"names", "pred": uint8 class ids (B, H, W)}`` at input size."""
        images, names = batch
        probs, _ = self.predict_probs(images, images.shape[-2:], self.test_scales, self.test_flip)
        return {"names": list(names), "pred": probs.argmax(1).to(torch.uint8).cpu()}
