"""Deep equilibrium models with PyTorch Lightning and Hydra.

``deq_lightning.load(run_dir_or_ckpt)`` gives a trained run's predictor, for use outside any
Trainer (:mod:`deq_lightning.app.inference`). Importing the package stays light: Lightning and
the models load on the first call.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from deq_lightning.app.inference import Predictor


def load(run_dir_or_ckpt: str | Path, device: str | torch.device = "cpu") -> Predictor:
    """The predictor of a trained run: a ``train.py`` run directory (its best checkpoint) or a
    ``.ckpt`` file inside one, on ``device`` (see :func:`deq_lightning.app.inference.load`)."""
    from deq_lightning.app.inference import load as load_predictor

    return load_predictor(run_dir_or_ckpt, device)


__all__ = ["load"]
