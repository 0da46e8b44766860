"""The segmentation app end to end: the seg_tiny experiment learns, predict_seg.py writes PNGs."""

from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from deq_lightning.app.predict_seg import predict_segmentation
from deq_lightning.app.train import train

from ..helpers.app import FAST, compose_cfg


@pytest.mark.slow
def test_short_training_on_the_embedded_set_beats_chance(tmp_path):
    cfg = compose_cfg(
        ["experiment=seg_tiny", *FAST, "trainer.max_epochs=2", "data.n_train=2500",
         "data.n_val=100", "data.n_test=200", "task.pretrain_steps=30"],
        tmp_path / "run",
    )  # fmt: skip
    metrics = train(cfg)
    # Chance: predicting background everywhere gives IoU ~0.85 for it and 0 for the 5 digits,
    # mIoU ~0.14.
    assert metrics["test/miou"] > 0.4, metrics
    assert 0.0 <= metrics["test/miou"] <= 1.0 and metrics["val/miou"] > 0.3
    assert metrics["test/iou_background"] > 0.9


def save_run_config(cfg, run_dir: Path) -> None:
    """What the Hydra app writes to <run>/.hydra/config.yaml (in-process runs do not)."""
    saved = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(saved, run_dir / ".hydra" / "config.yaml")


@pytest.mark.slow
def test_predict_seg_writes_pngs_for_a_folder_of_images(tmp_path):
    run_dir = tmp_path / "run"
    cfg = compose_cfg(
        ["experiment=seg_tiny", *FAST, "trainer.max_steps=2", "trainer.limit_val_batches=1",
         "test=false", "data.n_train=32", "data.n_val=4", "data.n_test=4"],
        run_dir,
    )  # fmt: skip
    train(cfg)
    save_run_config(cfg, run_dir)
    images = tmp_path / "mine"
    (images / "street").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, (h, w) in (("a.png", (24, 40)), ("street/b.jpg", (17, 33))):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / name)
    out = tmp_path / "pred"
    cfg = compose_cfg(
        [f"run_dir={run_dir}", f"input_dir={images}", f"output_dir={out}", "task.test_flip=true",
         "trainer.enable_progress_bar=false"],
        tmp_path / "predict_run",
        config_name="predict_seg",
    )  # fmt: skip
    written = predict_segmentation(cfg)
    assert sorted(p.relative_to(out).as_posix() for p in written) == [
        "classIds/a.png", "classIds/street/b.png", "color/a.png", "color/street/b.png",
    ]  # fmt: skip
    assert np.asarray(Image.open(out / "color/street/b.png")).shape == (17, 33, 3)
    ids = np.asarray(Image.open(out / "classIds/a.png"))
    assert ids.shape == (24, 40) and ids.max() < 6


def test_predict_seg_refuses_a_classification_run(tmp_path):
    run_dir = tmp_path / "run"
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    save_run_config(compose_cfg([], run_dir), run_dir)  # the digits classification default
    cfg = compose_cfg(
        [f"ckpt_path={ckpt}", f"input_dir={tmp_path}"], tmp_path / "p", config_name="predict_seg"
    )
    with pytest.raises(ValueError, match="needs a segmentation run"):
        predict_segmentation(cfg)
