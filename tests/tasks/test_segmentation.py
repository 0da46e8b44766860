import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from torchmetrics.classification import MulticlassConfusionMatrix

from deq_lightning.callbacks.segmentation import SegmentationMasks, SegmentationWriter
from deq_lightning.datamodules.segmentation import (
    CITYSCAPES_LABEL_IDS,
    CITYSCAPES_PALETTE,
    SyntheticSegDataModule,
    colorize,
    label_ids_to_train_ids,
    synthetic_palette,
)
from deq_lightning.tasks.segmentation import (
    SegmentationTask,
    ohem_cross_entropy,
    predict_probs,
    segmentation_scores,
    upsample,
)

from ..helpers.wandb_offline import config_and_history

TINY_MODEL = {
    "_target_": "deq_lightning.models.mdeq.MDEQSegmenter",
    "in_channels": 3,
    "num_classes": 3,
    "channels": [4, 8],
    "expansion": 2,
    "num_groups": 2,
    "dropout": 0.0,
    "downsample_times": 1,
    "bn_momentum": 0.1,
    "deq": {"solver": "anderson", "solver_opts": {"max_iter": 4}},
}


def tiny_task(**kwargs) -> SegmentationTask:
    return SegmentationTask(num_classes=3, model=dict(TINY_MODEL), **kwargs)


def tiny_data(**kwargs) -> SyntheticSegDataModule:
    opts = dict(batch_size=4, n_train=8, n_val=4, n_test=5, digits=[0, 1])
    return SyntheticSegDataModule(**{**opts, **kwargs})


# ----------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------


def test_scores_on_a_hand_computed_confusion_matrix():
    # rows: true class, columns: predicted class; class 3 appears nowhere.
    confmat = torch.tensor([[5, 1, 0, 0], [2, 3, 1, 0], [0, 1, 4, 0], [0, 0, 0, 0]])
    s = segmentation_scores(confmat)
    # IoU = tp / (true + predicted - tp): 5/(6+7-5), 3/(6+5-3), 4/(5+5-4), undefined
    assert s["iou"][:3].tolist() == pytest.approx([5 / 8, 3 / 8, 4 / 6])
    assert math.isnan(s["iou"][3])
    assert s["miou"].item() == pytest.approx((5 / 8 + 3 / 8 + 4 / 6) / 3)
    assert s["pixel_acc"].item() == pytest.approx(12 / 17)
    assert s["mean_acc"].item() == pytest.approx((5 / 6 + 3 / 6 + 4 / 5) / 3)


def test_a_class_only_predicted_counts_with_iou_zero():
    confmat = torch.tensor([[3, 1], [0, 0]])  # class 1 predicted once, never true
    s = segmentation_scores(confmat)
    assert s["iou"].tolist() == pytest.approx([3 / 4, 0.0])
    assert s["miou"].item() == pytest.approx(3 / 8)
    assert s["mean_acc"].item() == pytest.approx(3 / 4)


def test_confusion_matrix_skips_ignored_pixels():
    target = torch.tensor([[[0, 0, 1], [2, 255, 1]]])
    pred = torch.tensor([[[0, 1, 1], [2, 0, 0]]])
    m = MulticlassConfusionMatrix(3, ignore_index=255, validate_args=False)
    m.update(pred, target)
    assert m.compute().tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]


def _confmat_on_rank(rank: int, world: int, init_file: str, preds, targets, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        m = MulticlassConfusionMatrix(4, ignore_index=255)
        for i in range(rank, len(preds), world):  # the unpadded evaluation sampler's split
            m.update(preds[i], targets[i])
        scores = segmentation_scores(m.compute())
        torch.save(scores, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_miou_is_the_same_with_one_and_two_ranks(tmp_path):
    g = torch.Generator().manual_seed(0)
    # 5 images: rank 0 sees 3, rank 1 sees 2.
    targets = [torch.randint(0, 4, (1, 6, 7), generator=g) for _ in range(5)]
    targets[2][0, :2] = 255
    preds = [torch.where(torch.rand(t.shape, generator=g) < 0.6, t % 4, 3 - t % 4) for t in targets]
    single = MulticlassConfusionMatrix(4, ignore_index=255)
    for p, t in zip(preds, targets):
        single.update(p, t)
    expected = segmentation_scores(single.compute())
    torch.multiprocessing.spawn(
        _confmat_on_rank,
        args=(2, str(tmp_path / "init"), preds, targets, str(tmp_path)),
        nprocs=2,
    )
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert got["miou"].item() == pytest.approx(expected["miou"].item(), abs=1e-7)
        assert got["pixel_acc"].item() == pytest.approx(expected["pixel_acc"].item(), abs=1e-7)
        torch.testing.assert_close(got["iou"], expected["iou"], equal_nan=True)
    # and the one-rank numbers are not trivially those of one half
    half = MulticlassConfusionMatrix(4, ignore_index=255)
    for p, t in list(zip(preds, targets))[::2]:
        half.update(p, t)
    assert segmentation_scores(half.compute())["miou"] != pytest.approx(expected["miou"].item())


@pytest.mark.slow
def test_task_metrics_agree_between_one_process_and_ddp_spawn(tmp_path):
    task = tiny_task()

    def run(**trainer_kw):
        trainer = pl.Trainer(
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            default_root_dir=tmp_path,
            **trainer_kw,
        )
        return trainer.test(task, datamodule=tiny_data(eval_batch_size=2), verbose=False)[0]

    one = run(devices=1)
    two = run(devices=2, strategy="ddp_spawn")
    for key in ("test/miou", "test/pixel_acc", "test/iou_background", "test/iou_digit_1"):
        assert two[key] == pytest.approx(one[key], abs=1e-6), key


# ----------------------------------------------------------------------------------------------
# Loss
# ----------------------------------------------------------------------------------------------


def two_class_logits(p_true: list[float]) -> torch.Tensor:
    """Logits (1, 2, 1, N) whose softmax gives class 0 the probabilities ``p_true``."""
    p = torch.tensor(p_true)
    return torch.stack([torch.log(p / (1 - p)), torch.zeros_like(p)])[None, :, None, :]


def test_ohem_keeps_the_hard_pixels():
    logits = two_class_logits([0.9, 0.6, 0.3, 0.95, 0.5])
    target = torch.tensor([[[0, 0, 0, 0, 255]]])
    nll = -torch.log(torch.tensor([0.9, 0.6, 0.3, 0.95]))

    def ohem(min_kept: int) -> float:
        return ohem_cross_entropy(logits, target, None, 255, 0.7, min_kept).item()

    # min_kept 1: threshold max(0.3, 0.7) keeps p <= 0.7, i.e. 0.6 and 0.3
    assert ohem(1) == pytest.approx(nll[[1, 2]].mean().item(), rel=1e-5)
    # min_kept 3: the 3rd smallest probability, 0.9, raises the threshold
    assert ohem(3) == pytest.approx(nll[[0, 1, 2]].mean().item(), rel=1e-5)
    # more than there are: every valid pixel, i.e. plain cross entropy
    assert ohem(100) == pytest.approx(F.cross_entropy(logits, target, ignore_index=255).item())


def test_weighted_loss_ignores_255_and_upsamples_logits():
    task = tiny_task(class_weights=[1.0, 2.0, 0.5])
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 5)
    target = torch.randint(0, 3, (2, 8, 10))
    target[0, :3] = 255
    up = F.interpolate(logits, size=(8, 10), mode="bilinear", align_corners=False)
    logp = up.log_softmax(1)
    valid = target != 255
    t = target[valid]
    w = torch.tensor([1.0, 2.0, 0.5])[t]
    nll = -logp.permute(0, 2, 3, 1)[valid].gather(1, t[:, None])[:, 0]
    expected = (w * nll).sum() / w.sum()
    assert task.loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_batch_without_labelled_pixels_gives_a_zero_loss_with_gradient():
    task = tiny_task(class_weights=[1.0, 2.0, 0.5])
    logits = torch.randn(1, 3, 4, 4, requires_grad=True)
    loss = task.loss(logits, torch.full((1, 8, 8), 255))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))


def test_bad_task_options_fail_clearly():
    with pytest.raises(ValueError, match="class_weights needs 3 positive numbers"):
        tiny_task(class_weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="test_scales"):
        tiny_task(test_scales=[])
    with pytest.raises(ValueError, match="class_names has 2 names"):
        tiny_task(class_names=["a", "b"])


# ----------------------------------------------------------------------------------------------
# Multi-scale and flip inference
# ----------------------------------------------------------------------------------------------


def test_flip_inference_is_the_average_of_the_two_passes():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)  # not mirror-symmetric, lower resolution
    x = torch.randn(2, 3, 10, 14)
    with torch.no_grad():
        plain = upsample(conv(x), (10, 14)).softmax(1)
        mirrored = upsample(conv(x.flip(-1)), (10, 14)).softmax(1).flip(-1)
    probs = predict_probs(conv, x, (10, 14), flip=True)
    torch.testing.assert_close(probs, (plain + mirrored) / 2)
    assert not torch.allclose(probs, plain, atol=1e-3)
    torch.testing.assert_close(probs.sum(1), torch.ones(2, 10, 14))


def test_multi_scale_inference_resizes_each_view():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    seen = []

    def fn(v):
        seen.append(tuple(v.shape[-2:]))
        return conv(v)

    x = torch.randn(1, 3, 10, 14)
    probs = predict_probs(fn, x, (10, 14), scales=(0.5, 1.5), flip=True)
    assert seen == [(5, 7), (5, 7), (15, 21), (15, 21)]
    with torch.no_grad():
        views = []
        for size in ((5, 7), (15, 21)):
            xs = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            views.append(upsample(conv(xs), (10, 14)).softmax(1))
            views.append(upsample(conv(xs.flip(-1)), (10, 14)).softmax(1).flip(-1))
    torch.testing.assert_close(probs, sum(views) / 4)


def test_task_flip_inference_runs_the_model_twice_and_averages():
    task = tiny_task().eval()
    task.trainer = pl.Trainer(accelerator="cpu", logger=False)  # run_model asks for the stage
    x = torch.randn(2, 3, 12, 12)
    probs, stats = task.predict_probs(x, (12, 12), (1.0,), True)
    with torch.no_grad():
        a = upsample(task.model(x)[0], (12, 12)).softmax(1)
        b = upsample(task.model(x.flip(-1))[0], (12, 12)).softmax(1).flip(-1)
    torch.testing.assert_close(probs, (a + b) / 2, atol=1e-5, rtol=1e-4)
    assert stats.forward.nstep.shape == (2,)


# ----------------------------------------------------------------------------------------------
# Prediction writer and mask logging
# ----------------------------------------------------------------------------------------------


def test_cityscapes_writer_pngs_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    pred = rng.integers(0, 19, (9, 13)).astype(np.uint8)
    pred[0, :3] = 255  # an ignored/unknown id is written as labelId 0 (unlabeled)
    writer = SegmentationWriter(str(tmp_path), CITYSCAPES_PALETTE, CITYSCAPES_LABEL_IDS)
    color_path, ids_path = writer.write("berlin/berlin_000000_000019_leftImg8bit", pred)
    assert color_path == tmp_path / "color/berlin/berlin_000000_000019.png"
    assert ids_path == tmp_path / "labelIds/berlin/berlin_000000_000019.png"
    ids = Image.open(ids_path)
    assert ids.mode == "L"
    label_ids = np.asarray(ids)
    assert set(np.unique(label_ids)) <= {0, *CITYSCAPES_LABEL_IDS}
    np.testing.assert_array_equal(label_ids_to_train_ids(label_ids), pred)
    color = np.asarray(Image.open(color_path))
    np.testing.assert_array_equal(color, colorize(pred, CITYSCAPES_PALETTE))
    assert tuple(color[0, 0]) == (0, 0, 0)


def test_writer_without_benchmark_ids_writes_class_ids(tmp_path):
    pred = np.array([[0, 1, 2], [2, 1, 0]], dtype=np.uint8)
    writer = SegmentationWriter(str(tmp_path), synthetic_palette(3))
    _, ids_path = writer.write("scene", pred)
    assert ids_path == tmp_path / "classIds/scene.png"
    np.testing.assert_array_equal(np.asarray(Image.open(ids_path)), pred)


def test_mask_callback_does_nothing_without_image_loggers(tmp_path):
    callback = SegmentationMasks()
    example = (torch.zeros(1, 3, 4, 4), torch.zeros(1, 4, 4), torch.zeros(1, 4, 4))
    module = SimpleNamespace(mask_examples={"val": example}, class_names=["a", "b"])
    trainer = SimpleNamespace(
        loggers=[CSVLogger(tmp_path)], datamodule=None, current_epoch=0, global_step=0
    )
    callback.log_stage(trainer, module, "val")
    assert list(tmp_path.iterdir()) == []


def test_masks_reach_wandb_tensorboard_and_png(tmp_path):
    import wandb

    wandb_logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="test")
    tb_logger = TensorBoardLogger(str(tmp_path / "tb"))
    trainer = pl.Trainer(
        accelerator="cpu",
        max_epochs=1,
        limit_train_batches=1,
        limit_val_batches=1,
        num_sanity_val_steps=0,
        logger=[wandb_logger, tb_logger],
        callbacks=[SegmentationMasks(max_images=3, save_dir=str(tmp_path / "masks"))],
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
    )
    task = tiny_task()
    data = tiny_data()
    try:
        trainer.fit(task, datamodule=data)
        trainer.test(task, datamodule=data, verbose=False)
    finally:
        wandb.finish()
    # 3 panels of image | prediction | truth, each 32 x 96 enlarged 4x to 128 x 384
    for name in ("val_epoch_000.png", "test_test.png"):
        panel = np.asarray(Image.open(tmp_path / "masks" / name))
        assert panel.shape == (3 * 128, 384, 3)
    _, keys = config_and_history(next((tmp_path / "wandb").glob("offline-run-*/run-*.wandb")))
    # W&B image lists with their prediction / ground-truth mask overlays
    assert {"val/masks/all_masks", "test/masks/all_masks", "test/masks/count"} <= keys, keys
    assert list((tmp_path / "tb").rglob("events.out.tfevents.*"))
    assert task.class_names == ["background", "digit_0", "digit_1"]  # from the DataModule
