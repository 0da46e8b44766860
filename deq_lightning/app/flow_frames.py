"""Full-size frames for ``predict_flow.py``: the size a pair is solved at (``max_side``), the
memory check on the all-pairs correlation volume, and tiled solves (``tile``), so that photographs
of any size can be solved in bounded memory. The trade-offs are described in
:mod:`deq_lightning.app.predict_flow`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from deq_lightning.deq import DEQStats
from deq_lightning.tasks.flow import FlowTask

# ------------------------------------------------------------------------------ full-size frames

# Tiles per forward with tile_batch=null on a GPU, at most (fewer where their correlation volumes
# would take over half the free memory). On a CPU null means 1: there 8 tiles of 256 per forward
# took as long as one at a time, with 6x the memory (reports/flow/predict_memory.json).
MAX_TILE_BATCH = 8


def fit_size(size: Sequence[int], max_side: int | None) -> tuple[int, int]:
    """The ``(H, W)`` the model runs at: ``size`` downscaled so that its longer side is at most
    ``max_side`` (``None``: as is)."""
    h, w = int(size[0]), int(size[1])
    if max_side is None or max(h, w) <= max_side:
        return h, w
    scale = max_side / max(h, w)
    return max(1, round(h * scale)), max(1, round(w * scale))


def min_side(corr_levels: int) -> int:
    """The smallest input side (pixels) a model with ``corr_levels`` correlation levels takes: its
    coarsest level must keep 2 pixels."""
    return 8 * 2**corr_levels


def correlation_bytes(size: Sequence[int], corr_levels: int) -> int:
    """Bytes of the all-pairs correlation pyramid of a pair of ``size`` (float32, every pixel at
    1/8 of the padded size against every pixel of each pooled level): what grows as the square
    of the pixel count and what a full-size photograph runs out of memory on."""
    h8, w8 = -(-int(size[0]) // 8), -(-int(size[1]) // 8)
    return 4 * h8 * w8 * sum((h8 >> level) * (w8 >> level) for level in range(corr_levels))


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device`` (CPU: Linux's MemAvailable; ``None`` where unknown)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as fh:
            line = next(line for line in fh if line.startswith("MemAvailable:"))
    except (OSError, StopIteration):
        return None
    return int(line.split()[1]) * 1024


def tile_shape(run_size: Sequence[int], tile: int) -> tuple[int, int]:
    """The ``(H, W)`` of every tile of a frame solved at ``run_size``: the tile side, or the
    frame's along an axis shorter than it."""
    return min(tile, int(run_size[0])), min(tile, int(run_size[1]))


def largest_tile(run_size: Sequence[int], corr_levels: int, budget: float) -> int | None:
    """The largest tile side (a multiple of 8) whose correlation volume takes at most ``budget``
    bytes; ``None`` when not even the model's smallest input does."""
    best = None
    for side in range(min_side(corr_levels), max(run_size) + 1, 8):
        if correlation_bytes(tile_shape(run_size, side), corr_levels) > budget:
            break
        best = side
    return best


def check_frame_size(
    size: Sequence[int],
    max_side: int | None,
    corr_levels: int,
    device: torch.device,
    tile: int | None = None,
) -> tuple[int, int]:
    """The size the model runs at, after checking it: large enough for the model's correlation
    levels and small enough for its correlation volume (one tile's with ``tile``) to fit
    ``device``'s free memory; the errors name the ``max_side`` and the ``tile`` that work."""
    h, w = int(size[0]), int(size[1])
    run = fit_size((h, w), max_side)
    need_side = min_side(corr_levels)
    least = -(-need_side * max(h, w) // min(h, w))
    if run != (h, w) and min(run) < need_side:
        raise ValueError(
            f"max_side={max_side} shrinks {h}x{w} frames to {run[0]}x{run[1]}, below the "
            f"{need_side} px per side the model's {corr_levels} correlation levels need; set "
            f"max_side >= {least}"
        )
    solved = run if tile is None else tile_shape(run, tile)
    need, free = correlation_bytes(solved, corr_levels), available_bytes(device)
    if free is None or need <= free:
        return run
    what = f"{h}x{w} frames{f' (max_side={max_side}: {run[0]}x{run[1]})' if max_side else ''}"
    what = f"{what}: the model's" if tile is None else f"{what}, tile={tile}: one tile's"
    fixes = []
    if tile is None:
        side = int(max(run) * (free / 2 / need) ** 0.25) // 8 * 8  # half the free memory
        if side >= least:
            fixes.append(
                f"max_side={side} (frames downscaled before the model, flow upsampled back)"
            )
    fits = largest_tile(run, corr_levels, free / 2)  # half the free memory, as for max_side
    if fits:
        fixes.append(f"tile={fits} (solved at {run[0]}x{run[1]} in overlapping tiles)")
    if fixes:
        fix = f"set {' or '.join(fixes)}; conf/predict_flow.yaml"
    else:
        smallest = (
            f"tile >= {need_side}"
            if tile
            else f"max_side >= {least} (the model's smallest input) nor tile >= {need_side}"
        )
        fix = f"no {smallest} fits: free memory or use another device"
    raise MemoryError(
        f"{what} all-pairs correlation volume would take {need / 2**30:.1f} GiB, more than the "
        f"{free / 2**30:.1f} GiB free on {device}; {fix}"
    )


# ------------------------------------------------------------------------------ tiles


@dataclass(frozen=True)
class Tiling:
    """A frame at the size the model runs at, cut into overlapping tiles of one shape.

    Each tile pair is solved on its own, ``batch`` tiles per forward, and the flows are blended
    (:class:`TileBlend`). The tiles start every ``side - overlap`` pixels, the last row and column
    moved back to end at the frame's edge (no tile reaches beyond the frame, so none is padded
    with made-up pixels); along an axis shorter than ``side`` one tile spans it.
    """

    side: int
    overlap: int
    batch: int  # tiles per forward
    boxes: tuple[tuple[int, int, int, int], ...]  # (top, left, height, width)

    @property
    def shape(self) -> tuple[int, int]:
        return self.boxes[0][2], self.boxes[0][3]


def tile_starts(length: int, side: int, overlap: int) -> list[int]:
    """Where the tiles along one axis of ``length`` pixels start (see :class:`Tiling`)."""
    if length <= side:
        return [0]
    return [*range(0, length - side, side - overlap), length - side]


def tile_boxes(run_size: Sequence[int], side: int, overlap: int) -> list[tuple[int, int, int, int]]:
    """``(top, left, height, width)`` of every tile of a frame solved at ``run_size``, row-major."""
    (h, w), (th, tw) = run_size, tile_shape(run_size, side)
    rows, cols = tile_starts(int(h), side, overlap), tile_starts(int(w), side, overlap)
    return [(top, left, th, tw) for top in rows for left in cols]


def tile_options(cfg: DictConfig, corr_levels: int) -> tuple[int, int, int | None] | None:
    """``(tile, tile_overlap, tile_batch)`` as given, checked (``None``: untiled).

    ``tile_overlap`` defaults to a quarter of the tile: a tile's estimate is least sure near its
    inner sides (the encoders' receptive fields and the correlation lookup reach past them), so
    each pixel should take most of its flow from a tile in which it lies at least that far in
    (for tile=256, 64 px: twice the finest correlation radius of 4 cells at 1/8 size), at a cost
    of (4/3)**2, 1.8x, the tiles of an overlap-free cover.
    """
    tile, overlap, batch = cfg.get("tile"), cfg.get("tile_overlap"), cfg.get("tile_batch")
    if tile is None:
        for key, value in (("tile_overlap", overlap), ("tile_batch", batch)):
            if value is not None:
                raise ValueError(f"{key}={value} needs tile=<tile side in pixels>")
        return None
    need = min_side(corr_levels)
    if type(tile) is not int or tile < need:
        raise ValueError(
            f"tile={tile!r}: the model's {corr_levels} correlation levels need tiles of at least "
            f"{need} px per side; set tile >= {need} (256-512 for photographs), or tile=null"
        )
    if overlap is None:
        overlap = tile // 4
    if type(overlap) is not int or not 0 <= overlap < tile:
        raise ValueError(
            f"tile_overlap={overlap!r}: give 0 <= tile_overlap < tile={tile} pixels (tiles advance "
            f"by tile - tile_overlap), or tile_overlap=null for tile // 4 = {tile // 4}"
        )
    if batch is not None and (type(batch) is not int or batch < 1):
        raise ValueError(
            f"tile_batch={batch!r}: give a positive number of tiles per forward, or null (1 on a "
            f"CPU; on a GPU as many as fit in half the free memory, at most {MAX_TILE_BATCH})"
        )
    return tile, overlap, batch


def plan_tiling(
    run_size: Sequence[int],
    tile: int,
    overlap: int,
    batch: int | None,
    corr_levels: int,
    device: torch.device,
) -> Tiling:
    """The tiles of a frame solved at ``run_size`` (checked by :func:`check_frame_size` with
    ``tile``) and how many go through the model at once: ``batch``, or (``None``) one on a CPU
    and elsewhere as many as keep their correlation volumes within half of ``device``'s free
    memory, at most :data:`MAX_TILE_BATCH`. A ``batch`` that does not fit is refused with the
    one that does."""
    boxes = tile_boxes(run_size, tile, overlap)
    per_tile = correlation_bytes(boxes[0][2:], corr_levels)
    free = available_bytes(device)
    fits = None if free is None else max(1, int(free / 2 // per_tile))
    if batch is None:
        batch = 1 if device.type == "cpu" else min(MAX_TILE_BATCH, fits or MAX_TILE_BATCH)
    elif fits is not None and batch > fits:
        raise MemoryError(
            f"tile_batch={batch}: {batch} tiles of {boxes[0][2]}x{boxes[0][3]} would hold "
            f"{batch * per_tile / 2**30:.1f} GiB of correlation volumes, more than half the "
            f"{free / 2**30:.1f} GiB free on {device}; set tile_batch={fits}, or tile_batch=null"
        )
    return Tiling(tile, overlap, min(batch, len(boxes)), tuple(boxes))


def tile_weight(box: Sequence[int], run_size: Sequence[int], overlap: int) -> torch.Tensor:
    """A tile's ``(height, width)`` blending weight: a separable ramp rising linearly from each of
    its sides that lies inside the frame, from ``1 / (overlap + 1)`` at the side to 1 at
    ``overlap`` pixels in, flat towards the frame's edges. Never zero, so every pixel a tile
    covers has weight; two neighbours' ramps over an overlap of ``overlap`` pixels sum to 1."""
    top, left, th, tw = box

    def ramp(start: int, length: int, frame: int) -> torch.Tensor:
        i = torch.arange(length, dtype=torch.float32)
        weight = torch.ones(length)
        if start > 0:
            weight = torch.minimum(weight, (i + 1) / (overlap + 1))
        if start + length < frame:
            weight = torch.minimum(weight, (length - i) / (overlap + 1))
        return weight

    return ramp(top, th, int(run_size[0]))[:, None] * ramp(left, tw, int(run_size[1]))[None]


class TileBlend:
    """The flow of a frame from its tiles' flows: the sum of each flow times its
    :func:`tile_weight`, divided at every pixel by the sum of the weights there (so that the
    weights sum to 1). That sum is at least 1 (neighbours' ramps cross-fade over at least the
    overlap), so a tile whose weight at a pixel is w gives it at most w of its flow. Holds two
    frame-sized buffers, never every tile's flow."""

    def __init__(self, batch: int, tiling: Tiling, run_size: Sequence[int], device: torch.device):
        self.tiling, self.run_size = tiling, tuple(int(s) for s in run_size)
        self.flow = torch.zeros(batch, 2, *self.run_size, device=device)
        self.weight = torch.zeros(*self.run_size, device=device)

    def add(self, box: Sequence[int], flow: torch.Tensor) -> None:
        top, left, th, tw = box
        weight = tile_weight(box, self.run_size, self.tiling.overlap).to(flow.device)
        self.flow[..., top : top + th, left : left + tw] += weight * flow.float()
        self.weight[top : top + th, left : left + tw] += weight

    def result(self) -> torch.Tensor:
        return self.flow / self.weight


def solve_tiles(
    task: FlowTask,
    img1: torch.Tensor,
    img2: torch.Tensor,
    tiling: Tiling,
    flow_init: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[DEQStats]]:
    """A pair's flow ``(B, 2, H, W)`` blended from its tiles, each solved on its own; the tiles'
    ``flow_low``, tile after tile (``(tiles * B, 2, h, w)``: ``flow_init`` is read the same
    way, one warm start per tile) and the stats of each forward."""
    b = img1.shape[0]
    blend = TileBlend(b, tiling, img1.shape[-2:], img1.device)
    lows, stats = [], []
    for first in range(0, len(tiling.boxes), tiling.batch):
        boxes = tiling.boxes[first : first + tiling.batch]
        crops = [
            torch.cat([x[..., top : top + h, left : left + w] for top, left, h, w in boxes])
            for x in (img1, img2)
        ]
        init = None if flow_init is None else flow_init[first * b : (first + len(boxes)) * b]
        out, solve_stats = task.solve(*crops, init)
        for k, box in enumerate(boxes):
            blend.add(box, out["flow"][k * b : (k + 1) * b])
        lows.append(out["flow_low"])
        if solve_stats is not None:
            stats.append(solve_stats)
    return blend.result(), torch.cat(lows), stats


class PairSolve(NamedTuple):
    """A pair's flow at the frames' own size, the next pair's warm start and the solves' stats."""

    flow: torch.Tensor  # (B, 2, H, W)
    flow_low: torch.Tensor  # the model's flow at 1/8 of the padded size (one per tile when tiled)
    stats: list[DEQStats]  # one per forward; empty for an explicit model (RAFT)


def solve_within(
    task: FlowTask,
    img1: torch.Tensor,
    img2: torch.Tensor,
    run_size: Sequence[int],
    flow_init: torch.Tensor | None = None,
    tiling: Tiling | None = None,
) -> PairSolve:
    """The flow of a pair solved at ``run_size`` (:func:`check_frame_size`), whole or in
    ``tiling``'s tiles. Downscaling is antialiased; the flow is upsampled bilinearly and each
    component multiplied by its axis's size ratio."""
    size = tuple(img1.shape[-2:])
    run_size = tuple(int(s) for s in run_size)
    if run_size != size:
        img1, img2 = (
            F.interpolate(x, size=run_size, mode="bilinear", antialias=True) for x in (img1, img2)
        )
    if tiling is None:
        out, solve_stats = task.solve(img1, img2, flow_init)
        flow, low = out["flow"], out["flow_low"]
        stats = [] if solve_stats is None else [solve_stats]
    else:
        flow, low, stats = solve_tiles(task, img1, img2, tiling, flow_init)
    if run_size != size:
        flow = F.interpolate(flow.float(), size=size, mode="bilinear")
        ratio = torch.tensor([size[1] / run_size[1], size[0] / run_size[0]], device=flow.device)
        flow = flow * ratio.view(1, 2, 1, 1)
    return PairSolve(flow, low, stats)


def tiling_note(
    tiling: Tiling, run_size: Sequence[int], corr_levels: int, device: torch.device
) -> str:
    """One line on the tiles and the correlation volumes a forward of them holds, against the
    whole frame's."""
    (th, tw), n = tiling.shape, len(tiling.boxes)
    at_once = tiling.batch * correlation_bytes(tiling.shape, corr_levels) / 2**20
    whole = correlation_bytes(run_size, corr_levels) / 2**20
    return (
        f"{run_size[0]}x{run_size[1]} frames in {n} tiles of {th}x{tw} (overlap "
        f"{tiling.overlap} px), {tiling.batch} per forward on {device}: {at_once:,.1f} MiB of "
        f"correlation volumes at a time, against {whole:,.1f} MiB for the whole frame"
    )
