"""The flow app end to end: flow_tiny learns on the embedded set, predict_flow.py writes flows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deq_lightning.app.predict_flow import predict_flow
from deq_lightning.app.train import train
from deq_lightning.datamodules.flow_io import read_flo, read_kitti_png

from ..helpers.app import FAST, compose_cfg
from .test_segmentation import save_run_config


@pytest.mark.slow
def test_short_training_on_the_embedded_set_beats_zero_flow(tmp_path):
    # 300 steps (~2 CPU-minutes): at 200 the model is still leaving the zero-flow plateau (test
    # EPE 0.96x the zero flow's). Measured: test EPE 0.895x, val 0.765x; the full flow_tiny run
    # goes on to ~0.48x (reports/flow/default*.json).
    run_dir = tmp_path / "run"
    cfg = compose_cfg(
        ["experiment=flow_tiny", *FAST, "trainer.max_epochs=1", "data.train_size=2400",
         "data.val_size=16", "data.test_size=32"],
        run_dir,
    )  # fmt: skip
    metrics = train(cfg)
    assert metrics["test/epe"] < 0.95 * metrics["test/epe_zero"], metrics
    assert metrics["val/epe"] < metrics["val/epe_zero"]
    assert 0 <= metrics["test/1px"] <= metrics["test/3px"] <= metrics["test/5px"] <= 100
    assert {"test/fwd_nstep", "val/fwd_rel_res", "train/fwd_nstep"} <= set(metrics)
    assert (run_dir / "flow_images" / "test_test.png").is_file()


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory) -> Path:
    """A flow_tiny run of two steps with its saved config: enough for prediction."""
    run_dir = tmp_path_factory.mktemp("flow") / "run"
    cfg = compose_cfg(
        ["experiment=flow_tiny", *FAST, "trainer.max_steps=2", "trainer.limit_val_batches=1",
         "test=false", "data.train_size=16", "data.val_size=2", "data.test_size=2",
         "data.batch_size=2", "callbacks.flow_images=null"],
        run_dir,
    )  # fmt: skip
    train(cfg)
    save_run_config(cfg, run_dir)
    return run_dir


def frames(folder: Path, n: int, size: tuple[int, int] = (70, 90)) -> list[Path]:
    """``n`` frames of a random texture moving right by 2 px per frame."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, (size[0], size[1] + 2 * n, 3), dtype=np.uint8)
    paths = []
    for i in range(n):
        paths.append(folder / f"f{i:03d}.png")
        Image.fromarray(texture[:, 2 * (n - i) : 2 * (n - i) + size[1]]).save(paths[-1])
    return paths


def predict(run_dir: Path, tmp_path: Path, source: str, *extra: str) -> list:
    cfg = compose_cfg(
        [f"run_dir={run_dir}", f"input={source}", f"output_dir={tmp_path / 'out'}", *extra],
        tmp_path / "predict_run",
        config_name="predict_flow",
    )
    return predict_flow(cfg)


def test_predict_flow_on_two_images(flow_run, tmp_path):
    a, b = frames(tmp_path / "mine", 2)
    (result,) = predict(flow_run, tmp_path, f"[{a},{b}]")
    flow = read_flo(result.flo)
    assert result.name == "f000" and flow.shape == (70, 90, 2) and np.isfinite(flow).all()
    assert np.asarray(Image.open(result.color)).shape == (70, 90, 3)
    assert not result.warm_start and result.solver_steps > 0


def test_predict_flow_on_a_folder_warm_starts_along_the_sequence(flow_run, tmp_path):
    frames(tmp_path / "seq", 4)
    warm = predict(flow_run, tmp_path / "warm", str(tmp_path / "seq"))
    cold = predict(flow_run, tmp_path / "cold", str(tmp_path / "seq"), "warm_start=false")
    assert [r.name for r in warm] == ["f000", "f001", "f002"]
    assert [r.warm_start for r in warm] == [False, True, True]
    assert not any(r.warm_start for r in cold)
    # The first pair is solved alike; later ones start elsewhere, so the solve differs.
    assert warm[0].rel_residual == pytest.approx(cold[0].rel_residual)
    assert warm[1].rel_residual != pytest.approx(cold[1].rel_residual)
    summary = json.loads((tmp_path / "warm" / "out" / "summary.json").read_text())
    assert [s["name"] for s in summary] == ["f000", "f001", "f002"]


def test_predict_flow_reads_videos_and_explains_what_it_cannot_decode(flow_run, tmp_path):
    paths = frames(tmp_path / "gif_frames", 3)
    images = [Image.open(p) for p in paths]
    gif = tmp_path / "clip.gif"
    images[0].save(gif, save_all=True, append_images=images[1:], duration=40, loop=0)
    results = predict(flow_run, tmp_path / "gif", str(gif))
    assert [r.name for r in results] == ["frame_000000", "frame_000001"]
    broken = tmp_path / "clip.mp4"
    broken.write_bytes(b"not a video")
    with pytest.raises(RuntimeError, match=r"cannot decode the video(.|\n)*frames/%06d\.png"):
        predict(flow_run, tmp_path / "mp4", str(broken))
    with pytest.raises(ValueError, match="single image"):
        predict(flow_run, tmp_path / "one", str(paths[0]))


def test_predict_flow_max_side_solves_smaller_and_writes_full_size_flow(flow_run, tmp_path):
    a, b = frames(tmp_path / "big", 2, size=(96, 160))
    (result,) = predict(flow_run, tmp_path / "small", f"[{a},{b}]", "max_side=128")
    assert result.solved_size == [77, 128]  # 96x160 scaled by 128/160
    flow = read_flo(result.flo)
    assert flow.shape == (96, 160, 2) and np.isfinite(flow).all()
    assert np.asarray(Image.open(result.color)).shape == (96, 160, 3)
    (as_is,) = predict(flow_run, tmp_path / "as_is", f"[{a},{b}]", "max_side=160")
    assert as_is.solved_size == [96, 160]
    # flow_tiny's 3 correlation levels need 64 px per side: 96x160 may not shrink below 107.
    with pytest.raises(ValueError, match=r"max_side=64 shrinks 96x160 .* set max_side >= 107"):
        predict(flow_run, tmp_path / "tiny", f"[{a},{b}]", "max_side=64")
    with pytest.raises(ValueError, match="max_side='big': give a positive number"):
        predict(flow_run, tmp_path / "bad", f"[{a},{b}]", "max_side=big")


def test_predict_flow_refuses_a_pair_whose_correlation_volume_cannot_fit(
    flow_run, tmp_path, monkeypatch
):
    import deq_lightning.app.flow_frames as predict_flow_module

    a, b = frames(tmp_path / "big", 2, size=(96, 160))
    # 96x160 needs 12*20 * (240 + 60 + 15) float32s (302 KB) of correlation; say 200 KB are free:
    # a longer side of 120 px needs 91 KB, within half of them.
    monkeypatch.setattr(predict_flow_module, "available_bytes", lambda device: 200_000)
    with pytest.raises(MemoryError, match=r"0\.0 GiB free on cpu; set max_side=120 "):
        predict(flow_run, tmp_path / "a", f"[{a},{b}]", "device=cpu")
    monkeypatch.setattr(predict_flow_module, "available_bytes", lambda device: 20_000)
    with pytest.raises(MemoryError, match=r"no max_side >= 107 \(the model's smallest input\)"):
        predict(flow_run, tmp_path / "b", f"[{a},{b}]", "device=cpu")


def test_predict_flow_writes_benchmark_submissions(flow_run, tmp_path):
    from ..helpers.datasets import write_flow_datasets

    root = write_flow_datasets(tmp_path / "data")
    for data, expected in (
        ("sintel", ["clean/alley_1/frame0001.flo", "final/alley_1/frame0001.flo"]),
        ("kitti", ["000000_10.png", "000001_10.png"]),
    ):
        out = tmp_path / data
        cfg = compose_cfg(
            [f"run_dir={flow_run}", "benchmark=true", f"data={data}", f"data.data_dir={root}",
             "data.num_workers=0", f"output_dir={out}"],
            tmp_path / f"predict_{data}",
            config_name="predict_flow",
        )  # fmt: skip
        written = predict_flow(cfg)
        assert sorted(p.relative_to(out).as_posix() for p in written) == expected
    assert read_flo(tmp_path / "sintel" / "final/alley_1/frame0001.flo").shape == (64, 72, 2)
    flow, valid = read_kitti_png(tmp_path / "kitti" / "000000_10.png")
    assert flow.shape == (64, 72, 2) and valid.all()
    cfg = compose_cfg(
        [f"run_dir={flow_run}", "benchmark=true"], tmp_path / "p", config_name="predict_flow"
    )
    with pytest.raises(ValueError, match="needs benchmark test sets"):
        predict_flow(cfg)
