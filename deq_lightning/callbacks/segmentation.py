"""Segmentation outputs: predicted/true masks in W&B and TensorBoard, and PNG prediction files."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor

from deq_lightning.callbacks.images import EvalImages
from deq_lightning.callbacks.prediction import NamedPredictionWriter
from deq_lightning.datamodules.segmentation import (
    IGNORE_INDEX,
    colorize,
    synthetic_palette,
    train_ids_to_label_ids,
)


def to_uint8_image(
    x: Tensor, mean: Sequence[float] | None, std: Sequence[float] | None
) -> np.ndarray:
    """A normalised ``(3, H, W)`` network input back to a displayable ``(H, W, 3)`` uint8 image.

    Undoes ``mean``/``std`` when given; otherwise stretches the values to [0, 255].
    """
    x = x.detach().float().cpu()
    if mean is not None and std is not None:
        x = x * x.new_tensor(std).view(3, 1, 1) + x.new_tensor(mean).view(3, 1, 1)
    else:
        x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-12)
    return (x.clamp(0, 1) * 255 + 0.5).byte().permute(1, 2, 0).numpy()


def mask_panel(
    image: np.ndarray,
    pred: np.ndarray,
    target: np.ndarray,
    palette: np.ndarray,
    min_height: int = 0,
) -> np.ndarray:
    """Image | predicted mask | true mask, side by side (ignored pixels black).

    Small images are enlarged (nearest neighbour, an integer factor) to at least ``min_height``.
    """
    panel = np.concatenate([image, colorize(pred, palette), colorize(target, palette)], axis=1)
    factor = max(1, -(-min_height // panel.shape[0]))
    return panel.repeat(factor, axis=0).repeat(factor, axis=1) if factor > 1 else panel


class SegmentationMasks(EvalImages):
    """After each validation epoch (every ``every_n_epochs``) and after testing, log the first
    ``max_images`` images of the epoch with their predicted and true masks.

    W&B gets interactive mask overlays (``prediction`` / ``ground_truth`` with class names);
    TensorBoard gets image | prediction | truth panels; ``save_dir`` (optional) gets the panels as
    PNGs. Without such a logger and without ``save_dir`` it does nothing. The task keeps the
    examples in ``mask_examples`` (see :class:`~deq_lightning.tasks.segmentation.SegmentationTask`).
    """

    def log_stage(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        example = getattr(pl_module, "mask_examples", {}).get(stage)
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger | TensorBoardLogger)]
        if example is None or not (loggers or self.save_dir):
            return
        dm = getattr(trainer, "datamodule", None)
        mean, std = getattr(dm, "mean", None), getattr(dm, "std", None)
        names = list(getattr(pl_module, "class_names", []))
        palette = getattr(dm, "palette", None)
        if palette is None or len(palette) < len(names):
            palette = synthetic_palette(max(len(names), 2))
        images, preds, targets = example
        k = min(self.max_images, len(images))
        images = [to_uint8_image(images[i], mean, std) for i in range(k)]
        preds = [preds[i].numpy().astype(np.uint8) for i in range(k)]
        targets = [targets[i].numpy().astype(np.uint8) for i in range(k)]
        panels = [
            mask_panel(im, p, t, palette, min_height=128)
            for im, p, t in zip(images, preds, targets)
        ]
        key, step = f"{stage}/masks", trainer.global_step
        for logger in loggers:
            if isinstance(logger, WandbLogger):
                labels = {i: n for i, n in enumerate(names)} | {IGNORE_INDEX: "ignored"}
                masks = [
                    {
                        "prediction": {"mask_data": p, "class_labels": labels},
                        "ground_truth": {"mask_data": t, "class_labels": labels},
                    }
                    for p, t in zip(preds, targets)
                ]
                logger.log_image(key=key, images=images, step=step, masks=masks)
            else:
                logger.experiment.add_images(key, np.stack(panels), step, dataformats="NHWC")
        if self.save_dir:
            out = Path(self.save_dir)
            out.mkdir(parents=True, exist_ok=True)
            tag = f"epoch_{trainer.current_epoch:03d}" if stage == "val" else "test"
            Image.fromarray(np.concatenate(panels, axis=0)).save(out / f"{stage}_{tag}.png")


class SegmentationWriter(NamedPredictionWriter):
    """Writes each prediction of ``trainer.predict`` as PNGs under ``output_dir``.

    - ``color/<name>.png``: RGB, one palette colour per class (the Cityscapes palette there);
    - ``labelIds/<name>.png``: the dataset's own ids when it has them (``label_ids``; Cityscapes:
      0..33, the files the benchmark server takes), else ``classIds/<name>.png`` with the class
      index. Both are 8-bit single-channel PNGs, so they round-trip exactly.

    ``name`` is the image's path relative to the input folder, without its extension (and
    without Cityscapes' ``_leftImg8bit``), so sub-folders such as ``<city>/`` are kept.
    """

    key = "pred"

    def __init__(
        self, output_dir: str, palette: np.ndarray, label_ids: Sequence[int] | None = None
    ) -> None:
        super().__init__(output_dir)
        self.palette = np.asarray(palette, dtype=np.uint8)
        self.label_ids = None if label_ids is None else list(label_ids)
        self.ids_dir = "classIds" if self.label_ids is None else "labelIds"

    def write(self, name: str, pred: np.ndarray | Tensor) -> list[Path]:
        """Write one ``(H, W)`` class-id prediction; returns the files written."""
        pred = np.asarray(pred)
        ids = pred if self.label_ids is None else train_ids_to_label_ids(pred, self.label_ids)
        stem = name.removesuffix("_leftImg8bit")
        files = []
        for folder, array in (("color", colorize(pred, self.palette)), (self.ids_dir, ids)):
            path = self.output_dir / folder / f"{stem}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.ascontiguousarray(array)).save(path)
            files.append(path)
        self.written += files
        return files


__all__ = ["SegmentationMasks", "SegmentationWriter", "mask_panel", "to_uint8_image"]
