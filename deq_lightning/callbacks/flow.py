"""Flow outputs: colour-coded predicted vs true flow in W&B and TensorBoard, and PNG panels."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger
from torch import Tensor
from torchvision.utils import flow_to_image

from deq_lightning.callbacks.images import EvalImages
from deq_lightning.callbacks.prediction import NamedPredictionWriter
from deq_lightning.callbacks.segmentation import to_uint8_image
from deq_lightning.datamodules.flow_io import write_flo, write_kitti_png


def flow_pair_to_images(pred: Tensor, true: Tensor, valid: Tensor | None = None) -> np.ndarray:
    """Predicted and true ``(2, H, W)`` flows as two ``(H, W, 3)`` uint8 images on one colour
    scale (the Middlebury wheel, saturating at the longest vector of either), side by side.

    Pixels without ground truth (``valid < 0.5``) are black in the true flow.
    """
    both = torch.cat([pred.float(), true.float()], dim=-1)  # one call: a shared normalisation
    image = flow_to_image(both).permute(1, 2, 0).numpy().copy()
    if valid is not None:
        w = pred.shape[-1]
        image[:, w:][valid.numpy() < 0.5] = 0
    return image


def flow_panel(
    image: np.ndarray, pred: Tensor, true: Tensor, valid: Tensor | None, min_height: int = 0
) -> np.ndarray:
    """Frame 1 | predicted flow | true flow; small panels enlarged by an integer factor."""
    panel = np.concatenate([image, flow_pair_to_images(pred, true, valid)], axis=1)
    factor = max(1, -(-min_height // panel.shape[0]))
    return panel.repeat(factor, axis=0).repeat(factor, axis=1) if factor > 1 else panel


class FlowImages(EvalImages):
    """After each validation epoch (every ``every_n_epochs``) and after testing, log the first
    ``max_images`` pairs of the epoch as frame 1 | predicted flow | true flow.

    W&B and TensorBoard get the panels under ``{stage}/flow``; ``save_dir`` (optional) gets them
    as PNGs. The task keeps the pairs in ``flow_examples``
    (:class:`~deq_lightning.tasks.flow.FlowTask`).
    """

    def panels(self, example: tuple[Tensor, ...]) -> list[np.ndarray]:
        images, preds, flows, valids = example
        k = min(self.max_images, len(images))
        # Network inputs are in [0, 255] (DEQFlow normalises inside).
        return [
            flow_panel(
                to_uint8_image(images[i] / 255.0, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)),
                preds[i],
                flows[i],
                valids[i],
                min_height=128,
            )
            for i in range(k)
        ]

    def log_stage(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        example = getattr(pl_module, "flow_examples", {}).get(stage)
        loggers = [lg for lg in trainer.loggers if isinstance(lg, WandbLogger | TensorBoardLogger)]
        if example is None or not (loggers or self.save_dir):
            return
        panels = self.panels(example)
        key, step = f"{stage}/flow", trainer.global_step
        for logger in loggers:
            if isinstance(logger, WandbLogger):
                caption = ["frame 1 | predicted | true"] * len(panels)
                logger.log_image(key=key, images=panels, step=step, caption=caption)
            else:
                same = [p for p in panels if p.shape == panels[0].shape]
                logger.experiment.add_images(key, np.stack(same), step, dataformats="NHWC")
        if self.save_dir:
            out = Path(self.save_dir)
            out.mkdir(parents=True, exist_ok=True)
            tag = f"epoch_{trainer.current_epoch:03d}" if stage == "val" else "test"
            width = max(p.shape[1] for p in panels)
            padded = [np.pad(p, ((0, 0), (0, width - p.shape[1]), (0, 0))) for p in panels]
            Image.fromarray(np.concatenate(padded, axis=0)).save(out / f"{stage}_{tag}.png")


class FlowSubmissionWriter(NamedPredictionWriter):
    """Writes each flow of ``trainer.predict`` under ``output_dir`` in its benchmark's format.

    The DataModules name every benchmark test pair by its submission path: Sintel
    ``<pass>/<scene>/frameXXXX.flo`` (Middlebury ``.flo``, the layout the Sintel server takes),
    KITTI ``000000_10.png`` (16-bit PNG, all pixels valid; zip them in a ``flow/`` folder).
    """

    key = "flow"

    def write(self, name: str, flow: Tensor) -> Path:
        """Write one ``(2, H, W)`` flow; returns the file."""
        path = self.output_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        array = flow.float().permute(1, 2, 0).numpy()
        if path.suffix == ".flo":
            write_flo(path, array)
        elif path.suffix == ".png":
            write_kitti_png(path, array)
        else:
            raise ValueError(f"no flow format for {name!r}: a submission name ends in .flo or .png")
        self.written.append(path)
        return path


__all__ = ["FlowImages", "FlowSubmissionWriter", "flow_pair_to_images", "flow_panel"]
