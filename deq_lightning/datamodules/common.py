"""Pieces every DataModule shares: per-device batch sizes, layout errors, and the evaluation
loader whose metrics are exact across DDP ranks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
from torch.utils.data import DataLoader, Dataset, DistributedSampler


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


class UnpaddedDistributedSampler(DistributedSampler):
    """Evaluation sampler that gives rank ``r`` items ``r, r + W, ...`` and repeats nothing.

    Lightning's default DistributedSampler pads the dataset so every rank gets as many items,
    which counts a few examples twice in metrics summed over ranks. Evaluation batches need no
    such balance (no gradient all-reduce), so each example is counted exactly once here. Being a
    ``DistributedSampler``, Lightning keeps it (``use_distributed_sampler`` only replaces samplers
    of other types).
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False)
        self.num_samples = len(range(rank, len(dataset), num_replicas))
        self.total_size = len(dataset)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))


def eval_loader(
    dataset: Dataset, batch_size: int, num_workers: int, trainer: pl.Trainer | None, **kw: Any
) -> DataLoader:
    """A validation/test loader whose metrics are exact across DDP ranks."""
    sampler = None
    if trainer is not None and trainer.world_size > 1:
        sampler = UnpaddedDistributedSampler(dataset, trainer.world_size, trainer.global_rank)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        sampler=sampler,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        **kw,
    )
