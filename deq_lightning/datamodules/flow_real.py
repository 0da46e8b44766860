"""A real photograph pair with known motion that ships with a dependency: an evaluation that is
not a synthetic warp of the training photographs.

Provenance: ``skimage.data.stereo_motorcycle()``, the "Motorcycle" scene of the Middlebury 2014
stereo benchmark (Scharstein et al., GCPR 2014, https://vision.middlebury.edu/stereo/data/
scenes2014/), as scikit-image ships it: the left and right views of a rectified stereo rig,
500x741 RGB (the benchmark's default exposure, downscaled 4x by scikit-image), and the left
view's ground-truth disparity ``d`` in pixels (7.2-59.9; ``inf`` where unknown, 7% of pixels).

Rectified views differ along rows only: the left view's pixel at ``x`` is the right view's at
``x - d``, so the flow from frame 1 = left to frame 2 = right is ``(-d, 0)`` where ``d`` is known
(checked on the images: tests/datamodules/test_flow_real.py warps the right view back).
Pixels the right camera does not see (occlusions) have a disparity too, so scores count them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from deq_lightning.metrics.flow import epe_map

MOTORCYCLE_SOURCE = (
    "Middlebury 2014 stereo 'Motorcycle' (left -> right view, flow = (-disparity, 0)), as "
    "skimage.data.stereo_motorcycle() ships it"
)


@dataclass(frozen=True)
class RealFlowPair:
    """Frames as the flow DataModules serve them (``(3, H, W)`` float32 in [0, 255]), the ground
    truth ``flow`` ``(2, H, W)`` in pixels (x, y; zero where unknown) and its ``valid`` mask."""

    name: str
    image1: Tensor
    image2: Tensor
    flow: Tensor
    valid: Tensor  # (H, W) bool
    scale: float  # of the frames against the shipped 500x741 ones

    def epe(self, pred: Tensor) -> tuple[float, float]:
        """Mean end-point error of ``pred`` ``(2, H, W)`` over the valid pixels, and that of the
        zero flow on the same pixels (the score a model must beat to have learnt anything)."""
        if tuple(pred.shape) != tuple(self.flow.shape):
            raise ValueError(
                f"{self.name}: prediction {tuple(pred.shape)} must match the ground truth "
                f"{tuple(self.flow.shape)}; predict on this pair's image1/image2"
            )
        gt = self.flow[None]
        err = epe_map(pred[None].cpu(), gt)[0][self.valid]
        zero = epe_map(torch.zeros_like(gt), gt)[0][self.valid]
        return float(err.double().mean()), float(zero.double().mean())


def motorcycle_pair(scale: float = 1.0) -> RealFlowPair:
    """The Motorcycle pair (see the module docstring), its frames resized by ``scale`` in (0, 1].

    Downscaling filters the frames (antialiased bilinear) and averages the ground truth over
    each output pixel's footprint, multiplying it by the size ratio of its axis; an output
    pixel is valid only where its whole footprint is.
    """
    if not 0 < scale <= 1:
        raise ValueError(
            f"scale={scale}: the motorcycle pair can only be downscaled; pass 0 < scale <= 1"
        )
    import skimage.data

    left, right, disparity = skimage.data.stereo_motorcycle()
    known = np.isfinite(disparity)
    frames = [torch.from_numpy(v.copy()).permute(2, 0, 1).float() for v in (left, right)]
    valid = torch.from_numpy(known)
    flow = torch.zeros(2, *valid.shape)
    flow[0] = -torch.from_numpy(np.where(known, disparity, 0.0).astype(np.float32))
    if scale != 1:
        h, w = valid.shape
        size = (max(1, round(h * scale)), max(1, round(w * scale)))
        frames = [
            F.interpolate(x[None], size=size, mode="bilinear", antialias=True)[0].clamp(0, 255)
            for x in frames
        ]
        cover = F.interpolate(valid[None, None].float(), size=size, mode="area")[0, 0]
        flow = F.interpolate(flow[None], size=size, mode="area")[0] / cover.clamp_min(1e-6)
        flow *= torch.tensor([size[1] / w, size[0] / h]).view(2, 1, 1)
        valid = cover > 1 - 1e-4
        flow = torch.where(valid, flow, 0.0)
    return RealFlowPair("motorcycle", frames[0], frames[1], flow, valid, scale)


__all__ = ["MOTORCYCLE_SOURCE", "RealFlowPair", "motorcycle_pair"]
