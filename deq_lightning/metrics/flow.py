"""Optical-flow benchmark metrics as sums and counts (reduce across batches and ranks, then divide).

The benchmarks average in two different ways (deq-flow ``evaluate.py``, RAFT and the benchmark
kits agree):

* **Chairs, Things, Sintel**: the end-point error (EPE, the L2 norm of the flow error) and the
  1/3/5px rates (percent of pixels whose EPE is *below* 1, 3, 5) are pooled over all pixels of
  the whole set, so large images weigh more.
* **KITTI-2015**: EPE is the mean over each image's valid pixels, then averaged over images
  (``image_epe``); **F1-all** is the percent of valid pixels, pooled over the set, whose EPE is
  above 3 px *and* above 5% of the true flow's length.

Sums are float64 and counts int64: a float32 running count stops being exact at 2**24 (16.7M)
pixels, which Sintel's training set (464M pixels) passes after 38 frames.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torchmetrics import Metric

FLOW_METRIC_KEYS = (
    "epe_sum",
    "px1",
    "px3",
    "px5",
    "outliers",
    "pixels",
    "image_epe_sum",
    "images",
)


def flow_length(flow: Tensor, dim: int = 1) -> Tensor:
    """The length of each flow vector, the two components along ``dim`` (no gradient use).

    ``torch.hypot`` of the components: ``torch.linalg.vector_norm`` over a size-2 dimension
    is a strided reduction that runs orders of magnitude slower on the CPU (torch 2.14), and it
    had made the flow norms a visible share of every flow_tiny training step."""
    x, y = flow.float().unbind(dim)
    return torch.hypot(x, y)


def epe_map(pred: Tensor, gt: Tensor) -> Tensor:
    """Per-pixel end-point error ``(B, H, W)`` of flows ``(B, 2, H, W)``."""
    if pred.shape != gt.shape or pred.dim() != 4 or pred.shape[1] != 2:
        raise ValueError(
            f"flows must both be (B, 2, H, W); got prediction {tuple(pred.shape)} "
            f"and ground truth {tuple(gt.shape)}"
        )
    return flow_length(pred.float() - gt.float())


def flow_metric_sums(pred: Tensor, gt: Tensor, valid: Tensor | None = None) -> dict[str, Tensor]:
    """Sums and counts of one batch for every metric above (see :data:`FLOW_METRIC_KEYS`).

    ``valid`` ``(B, H, W)`` marks the pixels that count (value >= 0.5): KITTI's and HD1K's sparse
    ground truth. Leave it ``None`` for the dense sets, whose benchmarks count every pixel with a
    finite ground truth (NaN/Inf ground truth never counts).
    """
    if valid is not None and valid.shape != (gt.shape[0], *gt.shape[2:]):
        raise ValueError(
            f"valid mask {tuple(valid.shape)} does not match the flow's "
            f"{(gt.shape[0], *gt.shape[2:])}"
        )
    # Non-finite ground truth (a damaged .flo/.pfm) is an invalid pixel, never a NaN score.
    finite = torch.isfinite(gt).all(1)
    gt = torch.where(finite[:, None], gt, 0.0)
    epe = epe_map(pred, gt)
    mag = flow_length(gt)
    mask = finite if valid is None else finite & (valid >= 0.5)
    per_image_count = mask.flatten(1).sum(1)
    per_image_sum = torch.where(mask, epe, 0.0).flatten(1).double().sum(1)
    has_pixels = per_image_count > 0
    per_image_epe = per_image_sum / per_image_count.clamp_min(1)
    outlier = (epe > 3.0) & (epe > 0.05 * mag)
    return {
        "epe_sum": per_image_sum.sum(),
        "px1": ((epe < 1.0) & mask).sum(),
        "px3": ((epe < 3.0) & mask).sum(),
        "px5": ((epe < 5.0) & mask).sum(),
        "outliers": (outlier & mask).sum(),
        "pixels": per_image_count.sum(),
        "image_epe_sum": per_image_epe[has_pixels].sum(),
        "images": has_pixels.sum(),
    }


def finalize_flow_metrics(sums: dict[str, Tensor]) -> dict[str, Tensor]:
    """Ratios from (reduced) sums: ``epe``, ``1px``, ``3px``, ``5px``, ``f1_all`` (percent) and
    ``image_epe`` (KITTI's EPE)."""
    missing = [k for k in FLOW_METRIC_KEYS if k not in sums]
    if missing:
        raise KeyError(f"flow metric sums lack {missing}; build them with flow_metric_sums")
    pixels = sums["pixels"].double().clamp_min(1)
    return {
        "epe": sums["epe_sum"].double() / pixels,
        "1px": 100.0 * sums["px1"].double() / pixels,
        "3px": 100.0 * sums["px3"].double() / pixels,
        "5px": 100.0 * sums["px5"].double() / pixels,
        "f1_all": 100.0 * sums["outliers"].double() / pixels,
        "image_epe": sums["image_epe_sum"].double() / sums["images"].double().clamp_min(1),
    }


class FlowMetric(Metric):
    """The sums of :func:`flow_metric_sums` as a torchmetrics state, summed over DDP ranks.

    ``compute()`` adds every rank's sums before dividing (:func:`finalize_flow_metrics`), so the
    ratios are those of the whole set whatever the number of ranks, provided each pair is
    evaluated on exactly one rank (the flow DataModules' evaluation loaders make sure of that).
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for key in FLOW_METRIC_KEYS:
            dtype = torch.float64 if key.endswith("_sum") else torch.int64
            self.add_state(key, default=torch.zeros((), dtype=dtype), dist_reduce_fx="sum")

    def update(self, pred: Tensor, gt: Tensor, valid: Tensor | None = None) -> None:
        for key, value in flow_metric_sums(pred, gt, valid).items():
            setattr(self, key, getattr(self, key) + value.to(getattr(self, key).dtype))

    def compute(self) -> dict[str, Tensor]:
        return finalize_flow_metrics({k: getattr(self, k) for k in FLOW_METRIC_KEYS})
