"""Training augmentation of optical-flow pairs, as in the thesis repo (RAFT's augmentor, with the
parameters of each stage from deq-flow ``fetch_dataloader``), reimplemented in torch: colour
jitter, an occlusion eraser, random scale and stretch, flips and a crop. The sparse variant
(KITTI, HD1K) rescales flow by moving each valid pixel instead of interpolating.

Random draws use torch's global generator, which PyTorch seeds differently in every DataLoader
worker and epoch, and which ``pl.seed_everything`` makes reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms import v2


def _rand() -> float:
    return float(torch.rand(()))


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * _rand()


def _randint(lo: int, hi: int) -> int:
    """Uniform integer in ``[lo, hi)``."""
    return int(torch.randint(lo, hi, ()))


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]


def resize_sparse_flow(flow: Tensor, valid: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Rescale sparse flow without mixing valid and invalid pixels: move each valid pixel's
    centre to the new grid (nearest pixel) and scale its vector; the rest stay invalid."""
    h, w = valid.shape
    nh, nw = size
    fy, fx = nh / h, nw / w
    ys, xs = torch.nonzero(valid >= 0.5, as_tuple=True)
    yy = torch.round((ys + 0.5) * fy - 0.5).long()
    xx = torch.round((xs + 0.5) * fx - 0.5).long()
    keep = (xx >= 0) & (xx < nw) & (yy >= 0) & (yy < nh)
    new_flow = flow.new_zeros(2, nh, nw)
    new_valid = valid.new_zeros(nh, nw)
    ys, xs, yy, xx = ys[keep], xs[keep], yy[keep], xx[keep]
    new_flow[0, yy, xx] = flow[0, ys, xs] * fx
    new_flow[1, yy, xx] = flow[1, ys, xs] * fy
    new_valid[yy, xx] = 1.0
    return new_flow, new_valid


class FlowAugmentor:
    """Random photometric and spatial augmentation of a training pair (thesis repo settings).

    Dense (Chairs, Things, Sintel): colour jitter 0.4/0.4/0.4/hue 0.5/pi, per frame with
    probability 0.2 and shared otherwise; an eraser (p 0.5) filling 1-2 boxes of 50-99 px in frame
    2 with its mean colour (fake occlusions); scale ``2**U(min_scale, max_scale)`` applied with
    p 0.8, each axis stretched by ``2**U(-0.2, 0.2)`` with p 0.8, never below what the crop
    (+8 px) needs; horizontal (p 0.5) and vertical (p 0.1) flips; a random crop.
    Sparse (KITTI, HD1K): shared jitter 0.3/0.3/0.3/hue 0.3/pi, the same eraser, no stretch,
    sparse rescaling (:func:`resize_sparse_flow`), horizontal flips only, and crops that favour
    the borders (offsets drawn 20 px / 50 px beyond the image, then clamped).
    """

    def __init__(
        self,
        crop_size: Sequence[int],
        min_scale: float,
        max_scale: float,
        do_flip: bool = True,
        sparse: bool = False,
    ) -> None:
        self.crop = (int(crop_size[0]), int(crop_size[1]))
        self.min_scale, self.max_scale = min_scale, max_scale
        self.do_flip, self.sparse = do_flip, sparse
        strength, hue = (0.3, 0.3 / math.pi) if sparse else (0.4, 0.5 / math.pi)
        self.jitter = v2.ColorJitter(strength, strength, strength, hue)
        self.asymmetric_prob = 0.0 if sparse else 0.2

    def __call__(
        self, img1: Tensor, img2: Tensor, flow: Tensor, valid: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """uint8 images ``(3, H, W)``, flow ``(2, H, W)``, valid ``(H, W)`` -> float crops."""
        img1, img2 = self.color(img1, img2)
        img2 = self.erase(img2)
        return self.spatial(img1, img2, flow, valid)

    def color(self, img1: Tensor, img2: Tensor) -> tuple[Tensor, Tensor]:
        if _rand() < self.asymmetric_prob:
            return self.jitter(img1).float(), self.jitter(img2).float()
        both = self.jitter(torch.cat([img1, img2], dim=1)).float()
        return both[:, : img1.shape[1]], both[:, img1.shape[1] :]

    @staticmethod
    def erase(img2: Tensor) -> Tensor:
        if _rand() >= 0.5:
            return img2
        img2 = img2.clone()
        h, w = img2.shape[-2:]
        mean = img2.mean(dim=(1, 2), keepdim=True)
        for _ in range(_randint(1, 3)):
            x0, y0 = _randint(0, w), _randint(0, h)
            dx, dy = _randint(50, 100), _randint(50, 100)
            img2[:, y0 : y0 + dy, x0 : x0 + dx] = mean
        return img2

    def spatial(
        self, img1: Tensor, img2: Tensor, flow: Tensor, valid: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        ch, cw = self.crop
        h, w = img1.shape[-2:]
        margin = 1 if self.sparse else 8
        floor = max((ch + margin) / h, (cw + margin) / w)
        scale = 2 ** _uniform(self.min_scale, self.max_scale)
        sx = sy = scale
        if not self.sparse and _rand() < 0.8:
            sx *= 2 ** _uniform(-0.2, 0.2)
            sy *= 2 ** _uniform(-0.2, 0.2)
        sx, sy = max(sx, floor), max(sy, floor)
        if _rand() < 0.8 or h < ch or w < cw:
            size = (round(h * sy), round(w * sx))
            img1, img2 = _resize(img1, size), _resize(img2, size)
            if self.sparse:
                flow, valid = resize_sparse_flow(flow, valid, size)
            else:
                flow = (
                    _resize(flow, size) * flow.new_tensor([size[1] / w, size[0] / h])[:, None, None]
                )
                valid = (_resize(valid[None], size)[0] > 0.99).float()
        if self.do_flip and _rand() < 0.5:
            img1, img2, flow, valid = (t.flip(-1) for t in (img1, img2, flow, valid))
            flow = flow * flow.new_tensor([-1.0, 1.0])[:, None, None]
        if self.do_flip and not self.sparse and _rand() < 0.1:
            img1, img2, flow, valid = (t.flip(-2) for t in (img1, img2, flow, valid))
            flow = flow * flow.new_tensor([1.0, -1.0])[:, None, None]
        h, w = img1.shape[-2:]
        if self.sparse:
            y0 = min(max(_randint(0, h - ch + 20), 0), h - ch)
            x0 = min(max(_randint(-50, w - cw + 50), 0), w - cw)
        else:
            y0, x0 = _randint(0, h - ch + 1), _randint(0, w - cw + 1)
        window = (slice(y0, y0 + ch), slice(x0, x0 + cw))
        return (
            img1[(slice(None), *window)],
            img2[(slice(None), *window)],
            flow[(slice(None), *window)],
            valid[window],
        )
