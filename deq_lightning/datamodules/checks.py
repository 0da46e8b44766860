"""Data checks that name the file, the dataset and the fix: decoder errors wrapped with the path,
``data.verify`` (every file of a split checked at setup, all bad files reported at once), the
finiteness of float inputs, and a training split too small for one global batch.

A corrupt file otherwise fails late (at the first step or validation that reads it) and nameless
(PIL's "image file is truncated" from inside a DataLoader worker).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

log = logging.getLogger(__name__)
T = TypeVar("T")
SHOWN = 20  # bad files listed in one message


class DataFileError(ValueError):
    """A data file cannot be read (truncated, corrupt, wrong format): names the file and dataset."""

    def __init__(self, dataset: str, path: str | Path, problem: str) -> None:
        self.dataset, self.path = dataset, str(path)
        super().__init__(
            f"{dataset}: cannot read {path}: {problem}. Replace or remove the file "
            f"(data.verify=true checks every file of the dataset at setup and lists all bad ones)"
        )


def read_named(dataset: str, path: str | Path, reader: Callable[[Any], T]) -> T:
    """``reader(path)``, with any decoder error re-raised as :class:`DataFileError`."""
    try:
        return reader(path)
    except DataFileError:
        raise
    except Exception as e:  # PIL, numpy, torchvision and our format readers all raise differently
        text = str(e).removeprefix(f"{path}: ")
        raise DataFileError(dataset, path, f"{type(e).__name__}: {text}") from e


def check_verify_mode(verify: Any) -> bool | str:
    """``data.verify``: true (decode every file), "quick" (headers and sizes), false."""
    if not (isinstance(verify, bool) or verify == "quick"):
        raise ValueError(f'data.verify must be true, false or "quick", got {verify!r}')
    return verify


def quick_image_check(path: str | Path) -> None:
    """Header, size and chunk checksums of an image without decoding its pixels."""
    from PIL import Image

    with Image.open(path) as img:
        img.verify()


def verify_files(
    dataset: str, files: Sequence[tuple[Path, Callable[[Path], Any]]], what: str
) -> None:
    """Run each file's check (with a progress bar); one error listing every bad file."""
    from tqdm.auto import tqdm

    bad: list[str] = []
    for path, check in tqdm(files, desc=f"verifying {dataset} {what}", unit="file", leave=False):
        try:
            check(path)
        except Exception as e:
            text = str(e).removeprefix(f"{path}: ")
            bad.append(f"  {path}: {type(e).__name__}: {text}")
    if bad:
        more = f"\n  ... and {len(bad) - SHOWN} more" if len(bad) > SHOWN else ""
        raise DataFileError(
            dataset,
            f"{len(bad)} of {len(files)} files of the {what}",
            "\n" + "\n".join(bad[:SHOWN]) + more,
        )
    log.info("verified %d files of %s %s", len(files), dataset, what)


def nonfinite_rows(images: Tensor) -> Tensor:
    """Indices of the samples (first dimension) holding NaN or Inf."""
    if not images.is_floating_point():
        return torch.empty(0, dtype=torch.long)
    return (~torch.isfinite(images.flatten(1)).all(1)).nonzero().flatten()


def check_finite_inputs(images: Tensor, dataset: str, key: str = "data.check_finite") -> None:
    """Refuse float inputs with NaN/Inf at load, naming the samples (they would turn the loss,
    then the weights, non-finite)."""
    bad = nonfinite_rows(images)
    if len(bad):
        shown = bad[:SHOWN].tolist()
        raise ValueError(
            f"{dataset}: {len(bad)} of {len(images)} samples hold NaN or Inf values "
            f"(indices {shown}{' ...' if len(bad) > SHOWN else ''}); fix or drop them "
            f"({key}=false skips this check: the training step then skips such batches)"
        )


def check_train_size(
    n: int,
    batch_size: int,
    dataset: str,
    unit: str = "samples",
    remedy: str = "point data.data_dir at the complete dataset",
) -> None:
    """A training split smaller than one global batch trains zero or degenerate steps."""
    if n < batch_size:
        raise ValueError(
            f"{dataset}: the training split has {n} {unit}, fewer than one global batch "
            f"(data.batch_size={batch_size}); set data.batch_size<={n} or {remedy}"
        )
