"""Segment a folder of the user's own images with a trained run (``predict_seg.py``).

Kept beside :mod:`deq_lightning.run` (it reuses its run lookup and override merging) so that
tests can call it directly.
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import DataLoader

from deq_lightning.callbacks.segmentation import SegmentationWriter
from deq_lightning.datamodules.segmentation import ImageFiles
from deq_lightning.run import locate_run, merge_overrides, say
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
    run_dir, ckpt = locate_run(cfg)
    run_cfg = merge_overrides(
        OmegaConf.load(run_dir / ".hydra" / "config.yaml"), cfg, skip=PREDICT_OWN_KEYS
    )
    task_cls = hydra.utils.get_class(run_cfg.task._target_)
    if not issubclass(task_cls, SegmentationTask):
        raise ValueError(
            f"{run_dir} is a {task_cls.__name__} run; predict_seg.py needs a segmentation run"
        )
    datamodule = hydra.utils.instantiate(run_cfg.data, _convert_="all")  # metadata only
    task = task_cls.load_from_checkpoint(
        ckpt,
        map_location="cpu",
        weights_only=True,
        test_scales=list(run_cfg.task.test_scales),
        test_flip=bool(run_cfg.task.test_flip),
    )
    images = ImageFiles(cfg.input_dir, datamodule.mean, datamodule.std)
    loader = DataLoader(images, batch_size=1, num_workers=run_cfg.data.get("num_workers", 0))
    out = Path(cfg.output_dir or Path(cfg.paths.output_dir) / "predictions")
    writer = SegmentationWriter(str(out), datamodule.palette, datamodule.label_ids)
    trainer = hydra.utils.instantiate(
        run_cfg.trainer, callbacks=[writer], logger=False, _convert_="all"
    )
    say(f"segmenting {len(images)} images from {images.folder} with {ckpt}")
    trainer.predict(task, dataloaders=loader, return_predictions=False)
    say(f"predictions written to {out.resolve()} (color/ and {writer.ids_dir}/)")
    return writer.written
