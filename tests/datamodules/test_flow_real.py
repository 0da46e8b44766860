"""The real photograph pair (Middlebury Motorcycle via scikit-image): shapes, ground truth, sign."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deq_lightning.datamodules.flow_real import RealFlowPair, motorcycle_pair


@pytest.fixture(scope="module")
def pair() -> RealFlowPair:
    return motorcycle_pair()


def backward_warp(image: torch.Tensor, flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``image`` sampled at ``x + flow(x)`` (bilinear), and where that lies inside the image."""
    _, h, w = image.shape
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    x, y = xs + flow[0], ys + flow[1]
    grid = torch.stack([2 * x / (w - 1) - 1, 2 * y / (h - 1) - 1], -1)[None]
    warped = F.grid_sample(image[None], grid, align_corners=True)[0]
    return warped, (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)


def test_the_pair_loads_as_the_flow_datamodules_serve_frames(pair):
    assert pair.image1.shape == pair.image2.shape == (3, 500, 741)
    assert pair.image1.dtype == torch.float32 and 0 <= pair.image1.min() < pair.image1.max() <= 255
    assert pair.flow.shape == (2, 500, 741) and pair.valid.shape == (500, 741)
    assert 0.9 < pair.valid.float().mean() < 0.95  # the disparity is known on 92.7% of pixels
    u, v = pair.flow[0][pair.valid], pair.flow[1]
    assert u.min() > -60 and u.max() < -7 and v.abs().max() == 0  # rectified: rows only
    assert pair.flow[:, ~pair.valid].abs().max() == 0


def test_the_flow_maps_left_onto_right(pair):
    # frame2 (right view) sampled at x + flow must reproduce frame1 (left view); with the
    # opposite sign (or none) it does not. Occluded pixels keep a large error, so compare medians.
    def error(flow: torch.Tensor) -> float:
        warped, inside = backward_warp(pair.image2, flow)
        mask = pair.valid & inside
        return float((warped - pair.image1).abs().mean(0)[mask].median())

    right, unwarped, wrong_sign = error(pair.flow), error(0 * pair.flow), error(-pair.flow)
    assert right < 0.25 * unwarped and right < 0.25 * wrong_sign, (right, unwarped, wrong_sign)


def test_scaling_resizes_frames_and_scales_the_flow(pair):
    half = motorcycle_pair(scale=0.5)
    assert half.image1.shape == (3, 250, 370) and half.flow.shape == (2, 250, 370)
    # Output pixels are valid only where their whole footprint is: scattered holes grow.
    assert half.valid.shape == (250, 370) and 0.8 < half.valid.float().mean() < 0.9
    ratio = half.flow[0][half.valid].mean() / pair.flow[0][pair.valid].mean()
    assert ratio == pytest.approx(0.5, abs=0.01)
    # The downscaled frames still match through the downscaled flow.
    warped, inside = backward_warp(half.image2, half.flow)
    err = (warped - half.image1).abs().mean(0)[half.valid & inside].median()
    assert err < 0.25 * (half.image2 - half.image1).abs().mean(0)[half.valid].median()
    with pytest.raises(ValueError, match="0 < scale <= 1"):
        motorcycle_pair(scale=2.0)


def test_epe_counts_valid_pixels_against_the_zero_flow(pair):
    epe, zero = pair.epe(pair.flow)
    assert epe == 0.0 and zero == pytest.approx(float(pair.flow[0][pair.valid].abs().mean()))
    assert pair.epe(torch.zeros_like(pair.flow)) == (pytest.approx(zero), pytest.approx(zero))
    with pytest.raises(ValueError, match="must match the ground truth"):
        pair.epe(torch.zeros(2, 10, 10))
