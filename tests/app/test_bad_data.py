"""Bad data never destroys a run: each case on files (or arrays) the test writes, asserting the
message the user sees and that nothing non-finite or half-written is left behind."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra.utils import instantiate
from omegaconf import open_dict

from deq_lightning.app.build import build
from deq_lightning.app.checks import apply_trainer_choice, check_accelerator, check_config
from deq_lightning.app.train import train
from deq_lightning.callbacks.checkpoint import AtomicCheckpointIO, nonfinite_tensors
from deq_lightning.datamodules.checks import DataFileError
from deq_lightning.datamodules.classification import DigitsDataModule
from deq_lightning.datamodules.common import DatasetLayoutError
from deq_lightning.datamodules.flow import FlowAugmentor, FlowPairs, FlowSample
from deq_lightning.datamodules.flow_io import write_flo
from deq_lightning.datamodules.language import EmptySplitError, PTBDataModule
from deq_lightning.metrics.flow import flow_metric_sums
from deq_lightning.tasks.base import NonFiniteTrainingError

from ..helpers.app import FAST, compose_cfg, run_script
from ..helpers.datasets import (
    write_cityscapes,
    write_flow_datasets,
    write_image_folder,
    write_text_corpus,
)


def nan_digits(monkeypatch: pytest.MonkeyPatch, every: int = 8) -> np.ndarray:
    """sklearn's digits with NaN pixels in one image of ``every``; returns the bad indices."""
    import sklearn.datasets

    images, labels = sklearn.datasets.load_digits(return_X_y=True)
    images = images.copy()
    bad = np.arange(0, len(images), every)
    images[bad, 5] = np.nan
    monkeypatch.setattr(sklearn.datasets, "load_digits", lambda return_X_y: (images, labels))
    return bad


def no_temp_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*") if p.name.endswith(".tmp") or ".tmp" in p.suffixes]


def test_nan_pixels_are_refused_at_load_naming_the_images(monkeypatch):
    bad = nan_digits(monkeypatch)
    dm = DigitsDataModule()
    with pytest.raises(ValueError) as info:
        dm.setup("fit")
    text = str(info.value)
    assert f"{len(bad)} of 1797 samples hold NaN or Inf" in text
    assert str(bad[:3].tolist())[1:-1] in text and "data.check_finite=false" in text


def test_nonfinite_steps_are_skipped_and_the_weights_stay_finite(tmp_path):
    """Some batches carry NaN images: their steps are skipped (counted, logged, warned with the
    samples), every other step trains, and no weight or batch-norm statistic turns NaN."""
    cfg = compose_cfg([*FAST, "task.pretrain_steps=3", "data.batch_size=16"], tmp_path / "run")
    dm = DigitsDataModule(batch_size=16, check_finite=False)
    dm.setup("fit")
    train_ids = dm.train_set.indices
    dm.train_set.images[train_ids[::97]] = float("nan")  # ~13 images: some batches only

    class CountBad(pl.Callback):
        def __init__(self) -> None:
            self.bad = 0

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.bad += int(not torch.isfinite(batch[0]).all())

    counter = CountBad()
    task = instantiate(cfg.task, _recursive_=False)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=30,
        limit_val_batches=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[counter],
    )
    with pytest.warns(UserWarning, match=r"non-finite inputs in samples \[\d+"):
        trainer.fit(task, train_dataloaders=dm.train_dataloader())
    assert 0 < counter.bad < 30
    assert task.nonfinite_steps == counter.bad
    assert trainer.callback_metrics["train/nonfinite_steps"] == counter.bad
    assert trainer.global_step == 30
    assert not nonfinite_tensors(task.state_dict())


def test_a_nonfinite_run_stops_and_leaves_a_finite_resumable_checkpoint(tmp_path, monkeypatch):
    nan_digits(monkeypatch)
    run = tmp_path / "run"
    cfg = compose_cfg(
        [
            *FAST,
            "data.check_finite=false",  # every standardised image is NaN now
            "task.nonfinite_patience=3",
            "trainer.max_epochs=1",
        ],
        run,
    )
    with pytest.raises(NonFiniteTrainingError) as info:
        train(cfg)
    text = str(info.value)
    assert "3 non-finite steps in a row (task.nonfinite_patience)" in text
    assert "batch 2" in text and "non-finite inputs in samples [0, 1" in text
    notes = "\n".join(getattr(info.value, "__notes__", []))
    assert f"hydra.run.dir={run.resolve()}" in notes and "written at step 2" in notes
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert not nonfinite_tensors(ckpt["state_dict"]) and ckpt["nonfinite_steps"] == 3
    assert json.loads((run / "run_status.json").read_text())["status"] == "failed"
    assert no_temp_files(run)


def test_a_checkpoint_is_never_written_from_nonfinite_weights(tmp_path):
    path = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"state_dict": {"w": torch.ones(3)}}, path)
    io.save_checkpoint({"state_dict": {"w": torch.tensor([1.0, float("nan"), 2.0])}}, path)
    assert torch.equal(torch.load(path, weights_only=True)["state_dict"]["w"], torch.ones(3))
    assert no_temp_files(tmp_path)


# ------------------------------------------------------------------------------ flow


def test_nan_flo_ground_truth_is_invalid_and_never_spreads(tmp_path):
    h, w = 48, 64
    rng = np.random.default_rng(0)
    flow = rng.uniform(-2, 2, (h, w, 2)).astype(np.float32)
    flow[10:20, 10:30] = np.nan
    flow[30, 40, 0] = np.inf
    write_flo(tmp_path / "gt.flo", flow)
    from PIL import Image

    for name in ("a.png", "b.png"):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(tmp_path / name)
    sample = FlowSample(tmp_path / "a.png", tmp_path / "b.png", tmp_path / "gt.flo", "x")
    raw = FlowPairs([sample])[0]
    assert torch.isfinite(raw["flow"]).all()
    assert raw["valid"][10:20, 10:30].sum() == 0 and raw["valid"][30, 40] == 0
    assert raw["valid"].sum() == h * w - 10 * 20 - 1
    augmented = FlowPairs([sample], FlowAugmentor((32, 48), 0.0, 0.5))
    for _ in range(10):
        out = augmented[0]
        assert torch.isfinite(out["flow"]).all()
        # Invalid pixels never become valid: at most as many valid pixels as the scaled source.
        assert out["valid"].mean() < 1.0
    # Metrics and the loss on raw NaN ground truth (a batch built elsewhere): finite.
    gt = torch.from_numpy(flow).permute(2, 0, 1)[None]
    sums = flow_metric_sums(torch.zeros_like(gt), gt)
    assert int(sums["pixels"]) == h * w - 10 * 20 - 1 and torch.isfinite(sums["epe_sum"])
    from deq_lightning.tasks.flow import FlowTask, finite_ground_truth

    fixed, valid = finite_ground_truth(gt, torch.ones(1, h, w))
    task = SimpleNamespace(gamma=0.8, max_flow=400.0)  # loss() reads only these
    loss = FlowTask.loss(task, [torch.zeros_like(gt)], gt, torch.ones(1, h, w))
    assert torch.isfinite(fixed).all() and torch.isfinite(loss)
    assert int(valid.sum()) == h * w - 10 * 20 - 1


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


SINTEL = [
    "experiment=flow_tiny",
    "data=sintel",
    "data.batch_size=2",
    "data.num_workers=0",
    "data.crop_size=[48,64]",
    "task.scheduler.warmup=0.2",
]


def test_data_verify_lists_every_bad_file_at_setup(tmp_path):
    root = write_flow_datasets(tmp_path / "data")
    frame = root / "Sintel" / "training" / "final" / "alley_1" / "frame_0002.png"
    flo = root / "Sintel" / "training" / "flow" / "alley_1" / "frame_0001.flo"
    truncate(frame)
    truncate(flo)
    for mode in (True, "quick"):
        cfg = compose_cfg([*SINTEL, f"data.data_dir={root}"], tmp_path / "run")
        with open_dict(cfg):
            cfg.data.verify = mode
        dm = instantiate(cfg.data, _convert_="all")
        with pytest.raises(DataFileError) as info:
            dm.setup("fit")
        text = str(info.value)
        assert str(frame) in text and str(flo) in text, text
        assert "data=sintel: cannot read 2 of " in text and "data.verify" in text


def test_truncated_png_fails_named_with_a_checkpoint_and_nonzero_exit(tmp_path, run_env):
    root = write_flow_datasets(tmp_path / "data")
    frame = root / "Sintel" / "training" / "final" / "alley_1" / "frame_0002.png"
    truncate(frame)
    run = tmp_path / "run"
    proc = run_script(
        "train.py",
        [
            *SINTEL,
            *FAST,
            f"data.data_dir={root}",
            f"hydra.run.dir={run}",
            "trainer.max_steps=2",
            "trainer.num_sanity_val_steps=0",
            "callbacks.last_checkpoint.every_n_train_steps=1",
        ],
        run_env,
        tmp_path,
        check=False,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"sintel_final: cannot read {frame}" in out, out[-3000:]
    assert "continue the run with: python train.py" in out and f"hydra.run.dir={run}" in out
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert not nonfinite_tensors(ckpt["state_dict"])
    assert no_temp_files(run)


def test_a_training_split_smaller_than_one_batch_is_refused(tmp_path):
    root = write_flow_datasets(tmp_path / "data")
    (root / "FlyingChairs_release" / "chairs_split.txt").write_text("1\n2\n2\n")  # 1 train pair
    cfg = compose_cfg(
        [
            "experiment=flow_tiny",
            "data=chairs",
            f"data.data_dir={root}",
            "data.batch_size=2",
            "data.crop_size=[48,64]",
        ],
        tmp_path / "run",
    )
    dm = instantiate(cfg.data, _convert_="all")
    with pytest.raises(ValueError, match=r"has 1 pairs, fewer than one global batch "):
        dm.setup("fit")
    with pytest.raises(ValueError, match=r"data.batch_size=2\); set data.batch_size<=1"):
        dm.setup("fit")


# ------------------------------------------------------------------------------ sizes, classes


def test_num_classes_comes_from_the_data_and_a_mismatch_names_both(tmp_path):
    root = write_image_folder(tmp_path / "imagenet", classes=3, per_class=1, size=40)
    base = ["data=imagenet", f"data.data_dir={root}", "data.num_workers=0", "logger=csv"]
    cfg = compose_cfg([*base, "model.num_classes=1000"], tmp_path / "run")
    with pytest.raises(ValueError) as info:
        build(cfg, "train")
    assert "model.num_classes=1000 but the data has 3 classes" in str(info.value)
    assert "model.num_classes=null" in str(info.value)
    cfg = compose_cfg([*base, "model.num_classes=null"], tmp_path / "run")
    _, task, _, _ = build(cfg, "train")
    assert task.num_classes == 3 and task.hparams.model["num_classes"] == 3


def test_imagenet_layout_error_prints_as_lines(tmp_path):
    (tmp_path / "imagenet" / "train" / "n0").mkdir(parents=True)
    cfg = compose_cfg(["data=imagenet", f"data.data_dir={tmp_path / 'imagenet'}"], tmp_path / "r")
    with pytest.raises(DatasetLayoutError) as info:
        build(cfg, "train")
    lines = str(info.value).splitlines()
    assert len(lines) > 3 and lines[1] == "Expected layout:" and "\\n" not in str(info.value)


def test_an_empty_lm_split_names_the_file_and_writes_no_cache(tmp_path):
    root = write_text_corpus(
        tmp_path / "ptb", {s: f"ptb.{s}.txt" for s in ("train", "valid", "test")}
    )
    (root / "ptb.valid.txt").write_text("")
    dm = PTBDataModule(data_dir=str(root), batch_size=4, eval_batch_size=2, tgt_len=8)
    with pytest.raises(EmptySplitError) as info:
        dm.setup("fit")
    text = str(info.value)
    assert str(root / "ptb.valid.txt") in text and "0 tokens" in text
    assert "extract it again" in text and "batch_size" not in text
    assert not list(root.glob("lm-corpus-*"))


# ------------------------------------------------------------------------------ config names


def test_backward_option_errors_name_the_users_key(tmp_path):
    cfg = compose_cfg(["backward.max_iter=0"], tmp_path / "run")
    with pytest.raises(ValueError, match=r"backward\.max_iter must be an integer >= 1, got 0"):
        check_config(cfg)
    cfg = compose_cfg(["solver.eval_opts.max_iter=0"], tmp_path / "run")
    with pytest.raises(ValueError, match=r"solver\.eval_opts\.max_iter must be"):
        check_config(cfg)


def test_trainer_cpu_on_a_multi_gpu_experiment_runs_one_process(tmp_path):
    cfg = compose_cfg(["experiment=imagenet_mdeq_small", "trainer=cpu"], tmp_path / "run")
    assert cfg.trainer.devices == 4  # the experiment's GPUs, before the run adjusts it
    apply_trainer_choice(cfg)
    assert cfg.trainer.devices == 1 and cfg.trainer.accelerator == "cpu"
    typed = ["experiment=imagenet_mdeq_small", "trainer=cpu", "trainer.devices=2"]
    cfg = compose_cfg(typed, tmp_path / "run")
    apply_trainer_choice(cfg)
    assert cfg.trainer.devices == 2


def test_a_gpu_experiment_without_cuda_says_to_add_trainer_cpu(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    cfg = compose_cfg(["experiment=imagenet_mdeq_small"], tmp_path / "run")
    with pytest.raises(ValueError, match="no CUDA device is visible; add trainer=cpu"):
        check_accelerator(cfg)
    check_accelerator(compose_cfg(["experiment=imagenet_mdeq_small", "trainer=cpu"], tmp_path))


def test_cityscapes_reads_and_verify_name_the_bad_files(tmp_path):
    from deq_lightning.datamodules.segmentation import CityscapesDataModule

    root = write_cityscapes(tmp_path / "cityscapes")
    image = next((root / "leftImg8bit" / "train").rglob("*.png"))
    label = next((root / "gtFine" / "val").rglob("*_labelIds.png"))
    truncate(image)
    truncate(label)
    common = {"data_dir": str(root), "batch_size": 2, "num_workers": 0, "crop_size": (16, 32)}
    # Without verify: the bad file fails when read, named, not as PIL's bare message.
    dm = CityscapesDataModule(**common)
    dm.setup("fit")
    index = next(i for i, (img, _) in enumerate(dm.train_set.pairs) if img == image)
    with pytest.raises(DataFileError, match=f"Cityscapes: cannot read {image}"):
        dm.train_set[index]
    # With verify: both bad files at setup, in one message.
    for mode in (True, "quick"):
        with pytest.raises(DataFileError) as info:
            CityscapesDataModule(**common, verify=mode).setup("fit")
        text = str(info.value)
        assert str(image) in text and str(label) in text and "cannot read 2 of " in text, text
    # A training split smaller than one batch is refused with both numbers.
    with pytest.raises(ValueError, match=r"training split has 4 samples.*data.batch_size=8"):
        CityscapesDataModule(**{**common, "batch_size": 8}).setup("fit")
