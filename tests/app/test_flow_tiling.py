"""predict_flow.py's tiled prediction (``tile=``): the cover, the blend, the real model's tiles."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from PIL import Image

import deq_lightning.app.flow_frames as flow_frames
from deq_lightning.app.flow_frames import TileBlend, Tiling, tile_boxes, tile_weight
from deq_lightning.app.predict_flow import PairResult, solver_summary
from deq_lightning.datamodules.flow_io import read_flo

from . import test_flow
from .test_flow import frames, predict

flow_run = test_flow.flow_run  # the trained flow_tiny run, a fixture of this module too
# Tests that compare batched tiles with single ones at float-rounding tolerance solve with plain
# iteration, the training solver: flow_tiny's evaluation solver, Anderson, amplifies the rounding
# that a batched forward changes on this two-step (far from contractive) model; what they test is
# the batching, which is the same for every solver.
PLAIN = "solver.eval_opts.solver=fixed_point"


@pytest.mark.parametrize(
    ("size", "side", "overlap"),
    [((70, 203), 64, 16), ((203, 70), 64, 16), ((50, 300), 64, 0), ((129, 130), 64, 48),
     ((64, 64), 64, 16), ((30, 40), 64, 16)],
)  # fmt: skip
def test_tiles_cover_every_pixel_and_their_blending_weights_sum_to_one(size, side, overlap):
    boxes = tile_boxes(size, side, overlap)
    h, w = size
    assert {box[2:] for box in boxes} == {(min(side, h), min(side, w))}  # one shape, no padding
    for axis, length in ((0, h), (1, w)):
        starts = sorted({box[axis] for box in boxes})
        assert starts[0] == 0 and starts[-1] + min(side, length) == length  # edge-aligned
        assert all(b - a <= side - overlap for a, b in itertools.pairwise(starts))
    blend = TileBlend(1, Tiling(side, overlap, 1, tuple(boxes)), size, torch.device("cpu"))
    for box in boxes:
        weight = tile_weight(box, size, overlap)
        assert 0 < weight.min() <= weight.max() <= 1  # falls off towards sides, never to zero
        blend.add(box, torch.ones(1, 2, *box[2:]))
    # Every pixel covered, by weights summing to 1 or more (TileBlend's bound on a tile's share).
    assert blend.weight.min() >= 1 - 1e-6
    # The normalised weights sum to 1: blending ones gives one at every pixel.
    torch.testing.assert_close(blend.result(), torch.ones(1, 2, *size))


def test_two_neighbours_cross_fade_linearly_over_the_overlap():
    size, boxes = (64, 112), tile_boxes((64, 112), 64, 16)  # two tiles, columns 48-63 shared
    assert [box[1] for box in boxes] == [0, 48]
    blend = TileBlend(1, Tiling(64, 16, 2, tuple(boxes)), size, torch.device("cpu"))
    for value, box in enumerate(boxes):
        blend.add(box, torch.full((1, 2, 64, 64), float(value)))
    row = blend.result()[0, 0, 0]
    assert (row[:48] == 0).all() and (row[64:] == 1).all()
    torch.testing.assert_close(row[48:64], torch.arange(1, 17) / 17)


def test_a_tile_covering_the_whole_frame_gives_exactly_the_untiled_flow(flow_run, tmp_path):
    frames(tmp_path / "seq", 3)  # 70x90, moving right: the second pair is warm-started
    whole = predict(flow_run, tmp_path / "whole", str(tmp_path / "seq"))
    tiled = predict(flow_run, tmp_path / "tiled", str(tmp_path / "seq"), "tile=144")
    assert [r.tiles for r in tiled] == [1, 1] and tiled[0].tiling["tile_size"] == [70, 90]
    assert [r.warm_start for r in tiled] == [r.warm_start for r in whole] == [False, True]
    for a, b in zip(whole, tiled):
        assert np.array_equal(read_flo(a.flo), read_flo(b.flo))
        assert a.solver_steps == b.solver_steps and a.rel_residual == b.rel_residual


def test_a_pixel_covered_by_one_tile_only_takes_that_tiles_own_solve(flow_run, tmp_path):
    a, b = frames(tmp_path / "big", 2, size=(100, 203))
    # Tiles of 64 (overlap 16, the default) start at rows 0, 36 and columns 0, 48, 96, 139: only
    # the first tile covers rows 0-35 x columns 0-47 (its weight there is 1).
    crops = []
    for path in (a, b):
        crops.append(tmp_path / "crop" / path.name)
        crops[-1].parent.mkdir(exist_ok=True)
        Image.open(path).crop((0, 0, 64, 64)).save(crops[-1])
    (own,) = predict(flow_run, tmp_path / "own", f"[{crops[0]},{crops[1]}]", PLAIN)
    own_flow = read_flo(own.flo)
    for batch, atol in ((1, 0.0), (8, 1e-4)):
        (tiled,) = predict(
            flow_run,
            tmp_path / f"batch_{batch}",
            f"[{a},{b}]",
            "tile=64",
            f"tile_batch={batch}",
            PLAIN,
        )
        assert tiled.tiles == 8 and tiled.tiling["batch"] == batch
        flow = read_flo(tiled.flo)
        assert flow.shape == (100, 203, 2) and np.isfinite(flow).all()
        # One tile per forward is that tile's own solve; batched, float rounding apart.
        np.testing.assert_allclose(flow[:36, :48], own_flow[:36, :48], rtol=0, atol=atol)
        assert not np.allclose(flow[36:64, :48], own_flow[36:64, :48], atol=1e-3)  # blended


def test_tiled_sequences_warm_start_every_tile_and_report_every_tile(flow_run, tmp_path):
    frames(tmp_path / "seq", 3, size=(96, 160))
    seq = str(tmp_path / "seq")
    # max_side=128 solves at 77x128, tiled there: rows at 0 and 13, columns at 0, 48 and 64.
    tiled = ("max_side=128", "tile=64", PLAIN)
    results = predict(flow_run, tmp_path / "warm", seq, *tiled, "tile_batch=4")
    assert [r.warm_start for r in results] == [False, True]
    for r in results:
        assert r.tiles == 6 and r.solved_size == [77, 128]
        assert r.tiling == {"tile_size": [64, 64], "overlap": 16, "batch": 4}
        assert 0 <= r.tiles_converged <= 6 and r.converged == (r.tiles_converged == 6)
        assert read_flo(r.flo).shape == (96, 160, 2)
    # Each tile starts from its own previous solve, whichever forward it shares (4 + 2 tiles).
    single = predict(flow_run, tmp_path / "single", seq, *tiled)
    assert single[1].tiling["batch"] == 1 and single[1].warm_start  # null: 1 on a CPU
    np.testing.assert_allclose(read_flo(single[1].flo), read_flo(results[1].flo), atol=1e-4)
    cold = predict(flow_run, tmp_path / "cold", seq, *tiled, "warm_start=false")
    assert cold[0].rel_residual == pytest.approx(results[0].rel_residual, rel=1e-4)
    assert cold[1].rel_residual != pytest.approx(results[1].rel_residual)  # started elsewhere


def test_the_summary_counts_every_tiles_solve():
    tiling = {"tile_size": [64, 64], "overlap": 16, "batch": 8}

    def result(steps: float, converged: int) -> PairResult:
        return PairResult(
            "p", "p.flo", "p.png", False, steps, 0.02, steps, converged == 8, 24,
            tiles=8, tiles_converged=converged, tiling=tiling,
        )  # fmt: skip

    line = solver_summary([result(24.0, 0), result(12.0, 8)])
    assert "18.0 steps run of 24" in line and "8/16 tiles (8 per pair) converged" in line


@pytest.mark.parametrize(
    ("options", "error"),
    [
        (["tile=32"], r"tile=32: the model's 3 correlation levels need tiles of at least 64 px per "
         r"side; set tile >= 64"),
        (["tile=-5"], r"tile=-5: .* set tile >= 64"),
        (["tile=big"], r"tile='big': .* set tile >= 64"),
        (["tile=64", "tile_overlap=64"], r"tile_overlap=64: give 0 <= tile_overlap < tile=64 "
         r"pixels .* tile_overlap=null for tile // 4 = 16"),
        (["tile=64", "tile_overlap=-1"], r"tile_overlap=-1: give 0 <= tile_overlap < tile=64"),
        (["tile=64", "tile_batch=0"], r"tile_batch=0: give a positive number of tiles"),
        (["tile_overlap=16"], r"tile_overlap=16 needs tile=<tile side in pixels>"),
    ],
)  # fmt: skip
def test_bad_tile_options_are_refused_naming_the_option_and_the_fix(
    flow_run, tmp_path, options, error
):
    a, b = frames(tmp_path / "f", 2)
    with pytest.raises(ValueError, match=error):
        predict(flow_run, tmp_path, f"[{a},{b}]", *options)


def test_a_pair_too_large_for_memory_is_offered_a_tile_and_a_tile_batch_that_fit(
    flow_run, tmp_path, monkeypatch
):
    a, b = frames(tmp_path / "big", 2, size=(96, 160))
    # Say 200 KB are free: 96x160 needs 302 KB of correlation; an 88x88 tile 73 KB, within half
    # of them (96x96: 109 KB), and a 64x64 tile 21.5 KB: four to a forward.
    monkeypatch.setattr(flow_frames, "available_bytes", lambda device: 200_000)
    with pytest.raises(MemoryError, match=r"set max_side=120 \(.*\) or tile=88 \(solved at 96x160"):
        predict(flow_run, tmp_path / "a", f"[{a},{b}]")
    with pytest.raises(MemoryError, match=r"tile=144: one tile's .* set tile=88 "):
        predict(flow_run, tmp_path / "b", f"[{a},{b}]", "tile=144")
    with pytest.raises(MemoryError, match=r"tile_batch=8: .* set tile_batch=4, or tile_batch=null"):
        predict(flow_run, tmp_path / "c", f"[{a},{b}]", "tile=64", "tile_batch=8")
    (result,) = predict(flow_run, tmp_path / "d", f"[{a},{b}]", "tile=64")
    assert result.tiling["batch"] == 1 and result.tiles == 6  # null: 1 on a CPU
    gpu = flow_frames.plan_tiling((96, 160), 64, 16, None, 3, torch.device("cuda"))
    assert gpu.batch == 4  # null elsewhere: as many as fit
    monkeypatch.setattr(flow_frames, "available_bytes", lambda device: 20_000)
    with pytest.raises(MemoryError, match=r"tile=64: one tile's .* no tile >= 64 fits"):
        predict(flow_run, tmp_path / "e", f"[{a},{b}]", "tile=64")
