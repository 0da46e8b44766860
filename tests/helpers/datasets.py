"""Tiny datasets in their real on-disk layouts, for running experiment configs in tests."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
from PIL import Image


def write_cifar10(root: Path, n_train: int = 20, n_test: int = 10, seed: int = 0) -> Path:
    """``root/cifar-10-batches-py`` with 5 train batches, a test batch and batches.meta."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)

    def batch(n: int) -> dict:
        return {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": [int(i) % 10 for i in range(n)],
        }

    for i in range(1, 6):
        with open(folder / f"data_batch_{i}", "wb") as f:
            pickle.dump(batch(n_train // 5 or 1), f)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch(n_test), f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": [f"class{i}".encode() for i in range(10)]}, f)
    return root


def write_image_folder(root: Path, classes: int = 3, per_class: int = 2, size: int = 64) -> Path:
    """``root/{train,val}/<wnid>/*.JPEG`` with random images."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for c in range(classes):
            d = root / split / f"n{c:08d}"
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"img_{i}.JPEG")
    return root


QUICK = [
    "solver.max_iter=3",
    "solver.eval_opts={max_iter: 3}",
    "backward.max_iter=3",
    "task.pretrain_steps=0",
]


def overrides_for(experiment: str, tmp: Path) -> list[str]:
    """Data on disk + overrides that keep one batch of ``experiment`` fast on CPU."""
    if experiment.startswith("cifar10"):
        write_cifar10(tmp / "data")
        return [*QUICK, f"data.data_dir={tmp / 'data'}", "data.batch_size=2"]
    if experiment.startswith("imagenet"):
        write_image_folder(tmp / "data" / "imagenet", classes=6, per_class=1)
        return [
            *QUICK,
            f"data.data_dir={tmp / 'data' / 'imagenet'}",
            "data.batch_size=2",
            "model.num_classes=6",
            "data.image_size=64",
        ]
    return QUICK
