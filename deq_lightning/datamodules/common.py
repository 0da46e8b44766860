"""Pieces every DataModule shares: per-device batch sizes and layout errors."""

from __future__ import annotations

from pathlib import Path

import pytorch_lightning as pl


def per_device_batch_size(global_batch: int, trainer: pl.Trainer | None) -> int:
    """``batch_size`` in configs is global; each DDP rank loads ``batch_size / world_size``."""
    world = trainer.world_size if trainer is not None else 1
    if global_batch < 1 or global_batch % world:
        raise ValueError(
            f"data.batch_size={global_batch} must be a positive multiple of the world size "
            f"({world} processes = devices x nodes); set data.batch_size to a multiple of {world}"
        )
    return global_batch // world


class DatasetLayoutError(FileNotFoundError):
    """A dataset folder is missing or does not have the expected layout."""

    def __init__(self, name: str, root: str | Path, problem: str, layout: str, key: str) -> None:
        super().__init__(
            f"{name}: {problem} under {Path(root).resolve()}.\n"
            f"Expected layout:\n{layout.rstrip()}\n"
            f"Point {key}=<folder> at a folder with this layout (or fix the files listed above)."
        )
