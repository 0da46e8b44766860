"""``predict_seg.py``: segment a folder of the user's own images with a trained run."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig
from torch.utils.data import DataLoader

from deq_lightning.app.build import predict_to
from deq_lightning.app.console import say
from deq_lightning.app.runs import run_from
from deq_lightning.callbacks.segmentation import SegmentationWriter
from deq_lightning.datamodules.segmentation import ImageFiles
from deq_lightning.tasks.segmentation import SegmentationTask

PREDICT_OWN_KEYS = {"input_dir", "output_dir"}


def predict_segmentation(cfg: DictConfig) -> list[Path]:
    """Write colour and id PNGs for every image under ``cfg.input_dir``; returns the files.

    The run's saved config supplies the DataModule (palette, benchmark ids, normalisation) and
    the trainer; ``task.test_scales`` / ``task.test_flip`` given on the command line replace the
    run's inference settings.
    """
    if not cfg.get("input_dir"):
        raise ValueError("predict_seg.py needs input_dir=<folder of images>")
    run = run_from(cfg, "predict_seg.py", skip=PREDICT_OWN_KEYS)
    task_cls = run.task_class(SegmentationTask, "predict_seg.py needs a segmentation run")
    run_cfg = run.config
    datamodule = run.datamodule()  # metadata only
    task = run.load_task(
        task_cls,
        test_scales=list(run_cfg.task.test_scales),
        test_flip=bool(run_cfg.task.test_flip),
    )
    images = ImageFiles(cfg.input_dir, datamodule.mean, datamodule.std)
    loader = DataLoader(images, batch_size=1, num_workers=run_cfg.data.get("num_workers", 0))
    out = Path(cfg.output_dir or Path(cfg.paths.output_dir) / "predictions")
    writer = SegmentationWriter(str(out), datamodule.palette, datamodule.label_ids)
    say(f"segmenting {len(images)} images from {images.folder} with {run.ckpt}")
    predict_to(writer, run_cfg, task, dataloaders=loader)
    say(f"predictions written to {out.resolve()} (color/ and {writer.ids_dir}/)")
    return writer.written
