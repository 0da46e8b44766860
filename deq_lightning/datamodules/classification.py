"""Image classification data: sklearn digits (the embedded default), CIFAR-10, ImageNet.

Every DataModule here exposes ``num_classes``, ``in_channels`` and ``image_size`` right after
``__init__`` (the model config reads them) and serves ``(image float tensor (C, H, W), label)``
batches. ``batch_size`` is global; each process loads its share (see ``per_device_batch_size``).
"""

from __future__ import annotations

import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2

from deq_lightning.datamodules.checks import (
    check_finite_inputs,
    check_train_size,
    check_verify_mode,
    quick_image_check,
    read_named,
    verify_files,
)
from deq_lightning.datamodules.common import (
    DatasetLayoutError,
    eval_loader,
    per_device_batch_size,
)


class ImageArrayDataset(Dataset):
    """In-memory images ``(N, C, H, W)`` with labels, an optional per-sample transform, and an
    optional index subset (so train and validation can share one array with different
    transforms)."""

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        transform: v2.Transform | None = None,
        indices: Tensor | None = None,
    ) -> None:
        self.images, self.labels, self.transform = images, labels, transform
        self.indices = indices if indices is not None else torch.arange(len(labels))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        j = int(self.indices[i])
        x = self.images[j]
        if self.transform is not None:
            x = self.transform(x)
        return x, int(self.labels[j])


class ClassificationDataModule(pl.LightningDataModule):
    """Loaders shared by the datasets below; subclasses fill ``train/val/test_set`` in setup."""

    num_classes: int
    in_channels: int
    image_size: int

    def __init__(self) -> None:
        super().__init__()
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.batch_size_per_device: int | None = None

    def setup(self, stage: str | None = None) -> None:
        self.batch_size_per_device = per_device_batch_size(self.hparams.batch_size, self.trainer)
        if self.train_set is None:
            self.train_set, self.val_set, self.test_set = self.build_splits()
        if stage == "fit":  # a fit (a bare setup() only builds the splits)
            check_train_size(len(self.train_set), self.hparams.batch_size, type(self).__name__)

    def build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        raise NotImplementedError

    def loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        workers, pin = self.hparams.num_workers, torch.cuda.is_available()
        if not train:  # each image on exactly one rank: top-1 over ranks counts it once
            return eval_loader(
                dataset, self.batch_size_per_device, workers, self.trainer, pin_memory=pin
            )
        return DataLoader(
            dataset,
            batch_size=self.batch_size_per_device,
            shuffle=True,
            # A last batch of one sample breaks BatchNorm in train mode.
            drop_last=len(dataset) > self.batch_size_per_device,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=pin,
        )

    def train_dataloader(self) -> DataLoader:
        return self.loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self.loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self.loader(self.test_set, train=False)


# ----------------------------------------------------------------------------------------------
# sklearn digits: the embedded default (ships with scikit-learn, no download)
# ----------------------------------------------------------------------------------------------


class DigitsDataModule(ClassificationDataModule):
    """scikit-learn's 1797 handwritten digits (8x8 grayscale, 10 classes).

    Split train/val/test with stratification, deterministically from ``seed`` (keep it fixed to
    compare runs: it picks the test set). Pixels (0..16) are standardised with the training
    split's mean and std.
    """

    num_classes = 10
    in_channels = 1
    image_size = 8

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        check_finite: bool = True,
    ) -> None:
        if not (val_fraction > 0 and test_fraction > 0 and val_fraction + test_fraction < 1):
            raise ValueError(
                f"data.val_fraction={val_fraction} and data.test_fraction={test_fraction} must be "
                "positive and sum to less than 1"
            )
        super().__init__()
        self.save_hyperparameters()

    def build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        images, labels = load_digits(return_X_y=True)
        if self.hparams.check_finite:
            # Before standardising: one NaN pixel would make every image NaN.
            check_finite_inputs(torch.as_tensor(images), "digits (sklearn.datasets.load_digits)")
        n = len(labels)
        n_val = round(self.hparams.val_fraction * n)
        n_test = round(self.hparams.test_fraction * n)
        index = np.arange(n)
        rest, test = train_test_split(
            index, test_size=n_test, stratify=labels, random_state=self.hparams.seed
        )
        train, val = train_test_split(
            rest, test_size=n_val, stratify=labels[rest], random_state=self.hparams.seed
        )
        x = torch.as_tensor(images, dtype=torch.float32).view(n, 1, 8, 8)
        mean, std = x[train].mean(), x[train].std()
        x = (x - mean) / std
        y = torch.as_tensor(labels)
        return tuple(
            ImageArrayDataset(x, y, indices=torch.as_tensor(np.sort(split)))
            for split in (train, val, test)
        )


# ----------------------------------------------------------------------------------------------
# CIFAR-10: the python pickle batches from https://www.cs.toronto.edu/~kriz/cifar.html
# ----------------------------------------------------------------------------------------------

CIFAR10_LAYOUT = """\
<data_dir>/cifar-10-batches-py/     (or data_dir pointing at this folder itself)
    data_batch_1 ... data_batch_5      training batches (10000 images each)
    test_batch                         test batch (10000 images)
    batches.meta                       label names
  each a pickle of {b'data': uint8 array (N, 3072), b'labels': [N ints in 0..9]}
  (the archive cifar-10-python.tar.gz, unpacked)"""

# Normalisation of the thesis repo (MDEQ-Vision tools/cls_train.py; docs/thesis.md §2).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2023, 0.1994, 0.2010)
CIFAR10_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_FILES = (*CIFAR10_TRAIN_FILES, "test_batch", "batches.meta")


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """The CIFAR batches are pickles; allow only the numpy array machinery they need, so that a
    wrong or hostile file in data_dir cannot run code."""

    def find_class(self, module: str, name: str) -> object:
        if module.split(".")[0] == "numpy" and name in {
            "_reconstruct",
            "ndarray",
            "dtype",
            "scalar",
            "_frombuffer",
        }:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


class CIFAR10DataModule(ClassificationDataModule):
    """CIFAR-10 from the local python pickle batches.

    With ``val_size=0`` (default) the test batch doubles as the validation set, as in the thesis
    repo (``TEST_SET: val``); otherwise ``val_size`` training images (chosen by ``seed``, e.g.
    5000) are held out for validation and the test batch is kept for testing only. Training augmentation (``augment``): RandomCrop(32, padding 4) and a
    horizontal flip; the thesis's TINY config turns it off.
    """

    num_classes = 10
    in_channels = 3
    image_size = 32

    def __init__(
        self,
        data_dir: str = "data/cifar10",
        batch_size: int = 128,
        num_workers: int = 4,
        seed: int = 0,
        val_size: int = 0,
        augment: bool = True,
    ) -> None:
        if not 0 <= val_size < 50000:
            raise ValueError(f"data.val_size must be in [0, 50000), got {val_size}")
        super().__init__()
        self.save_hyperparameters()
        self.class_names: list[str] | None = None

    def root(self) -> Path:
        base = Path(self.hparams.data_dir).expanduser()
        nested = base / "cifar-10-batches-py"
        return nested if nested.is_dir() else base

    def layout_error(self, root: Path, problem: str) -> DatasetLayoutError:
        return DatasetLayoutError("CIFAR-10", root, problem, CIFAR10_LAYOUT, "data.data_dir")

    def read(self, path: Path) -> dict:
        try:
            with open(path, "rb") as f:
                obj = _NumpyOnlyUnpickler(f, encoding="bytes").load()
        except Exception as e:
            raise self.layout_error(
                path.parent, f"{path.name} is not a CIFAR-10 pickle ({type(e).__name__}: {e})"
            ) from None
        if not isinstance(obj, dict):
            raise self.layout_error(
                path.parent, f"{path.name} holds a {type(obj).__name__}, not a dict"
            )
        return obj

    def read_batch(self, path: Path) -> tuple[Tensor, Tensor]:
        batch = self.read(path)
        data, labels = batch.get(b"data"), batch.get(b"labels")
        if data is None or labels is None:
            raise self.layout_error(
                path.parent,
                f"{path.name} lacks b'data' or b'labels' (keys: {sorted(map(str, batch))})",
            )
        data, labels = np.asarray(data), np.asarray(labels)
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
            raise self.layout_error(
                path.parent,
                f"{path.name}: b'data' is {data.dtype} {data.shape}, expected uint8 (N, 3072)",
            )
        if labels.shape != (len(data),) or labels.min(initial=0) < 0 or labels.max(initial=0) > 9:
            raise self.layout_error(
                path.parent,
                f"{path.name}: b'labels' must hold {len(data)} integers in 0..9",
            )
        images = torch.from_numpy(data.reshape(-1, 3, 32, 32).copy())
        return images, torch.as_tensor(labels, dtype=torch.long)

    def build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        root = self.root()
        if not root.is_dir():
            raise self.layout_error(root, "nothing found")
        missing = [name for name in CIFAR10_FILES if not (root / name).is_file()]
        if missing:
            raise self.layout_error(root, f"missing files {missing}")
        meta = self.read(root / "batches.meta")
        names = meta.get(b"label_names")
        if names is None or len(names) != 10:
            raise self.layout_error(root, "batches.meta lacks the 10 b'label_names'")
        self.class_names = [n.decode() if isinstance(n, bytes) else str(n) for n in names]

        parts = [self.read_batch(root / name) for name in CIFAR10_TRAIN_FILES]
        train_x = torch.cat([x for x, _ in parts])
        train_y = torch.cat([y for _, y in parts])
        test_x, test_y = self.read_batch(root / "test_batch")

        val_size = self.hparams.val_size
        if val_size >= len(train_y):
            raise ValueError(
                f"data.val_size={val_size} leaves no training images ({len(train_y)} found)"
            )
        order = torch.randperm(
            len(train_y), generator=torch.Generator().manual_seed(self.hparams.seed)
        )
        eval_tf = v2.Compose(
            [v2.ToDtype(torch.float32, scale=True), v2.Normalize(CIFAR10_MEAN, CIFAR10_STD)]
        )
        train_tf = eval_tf
        if self.hparams.augment:
            train_tf = v2.Compose(
                [v2.RandomCrop(32, padding=4), v2.RandomHorizontalFlip(), eval_tf]
            )
        train = ImageArrayDataset(train_x, train_y, train_tf, order[val_size:].sort().values)
        test = ImageArrayDataset(test_x, test_y, eval_tf)
        val = (
            ImageArrayDataset(train_x, train_y, eval_tf, order[:val_size].sort().values)
            if val_size
            else test
        )
        return train, val, test


# ----------------------------------------------------------------------------------------------
# ImageNet: an ImageFolder tree of JPEGs
# ----------------------------------------------------------------------------------------------

IMAGENET_LAYOUT = """\
<data_dir>/train/<wnid>/*.JPEG    e.g. train/n01440764/n01440764_10026.JPEG
<data_dir>/val/<wnid>/*.JPEG      validation images sorted into the same class folders
  (the thesis repo's <data_dir>/images/{train,val}/... is accepted too)"""


class ImageNetDataModule(ClassificationDataModule):
    """ImageNet (or any ImageFolder tree with ``train/`` and ``val/``).

    Train: RandomResizedCrop(224) + horizontal flip; eval: Resize(256) + CenterCrop(224); ImageNet
    mean/std (thesis repo ``tools/cls_train.py``), built by timm's transform factory. ``val``
    doubles as the test set (ImageNet's test labels are not public). ``num_classes`` is the number
    of class folders under ``train/``.
    """

    in_channels = 3

    def __init__(
        self,
        data_dir: str = "data/imagenet",
        batch_size: int = 256,
        num_workers: int = 8,
        image_size: int = 224,
        crop_pct: float = 0.875,
        verify: bool | str = False,
    ) -> None:
        check_verify_mode(verify)
        super().__init__()
        self.save_hyperparameters()
        self.image_size = image_size
        self.root = self.find_root(Path(data_dir).expanduser())
        self.class_names = self.check_classes()
        self.num_classes = len(self.class_names)

    def layout_error(self, root: Path, problem: str) -> DatasetLayoutError:
        return DatasetLayoutError("ImageNet", root, problem, IMAGENET_LAYOUT, "data.data_dir")

    def find_root(self, base: Path) -> Path:
        for root in (base, base / "images"):
            if (root / "train").is_dir() and (root / "val").is_dir():
                return root
        missing = [s for s in ("train", "val") if not (base / s).is_dir()]
        raise self.layout_error(base, f"no {' or '.join(missing)} folder")

    def class_dirs(self, split: str) -> list[str]:
        return sorted(p.name for p in (self.root / split).iterdir() if p.is_dir())

    def check_classes(self) -> list[str]:
        train, val = self.class_dirs("train"), self.class_dirs("val")
        if not train:
            raise self.layout_error(self.root, "train/ has no class folders")
        if train != val:
            only_train = sorted(set(train) - set(val))[:5]
            only_val = sorted(set(val) - set(train))[:5]
            raise self.layout_error(
                self.root,
                f"train/ and val/ have different class folders ({len(train)} vs {len(val)}; "
                f"only in train: {only_train}, only in val: {only_val}, first 5 shown)",
            )
        return train

    def transform(self, train: bool) -> v2.Transform:
        from timm.data import create_transform

        return create_transform(
            self.image_size,
            is_training=train,
            color_jitter=None,  # the thesis trains with crop + flip only
            interpolation="bilinear",
            crop_pct=self.hparams.crop_pct,
        )

    def folder(self, split: str) -> Dataset:
        from torchvision.datasets import ImageFolder

        dataset = ImageFolder(
            str(self.root / split),
            self.transform(split == "train"),
            loader=NamedImageLoader(f"ImageNet {split}/"),
            allow_empty=True,
        )
        counts = Counter(dataset.targets)
        empty = [c for i, c in enumerate(dataset.classes) if counts[i] == 0]
        if empty:
            raise self.layout_error(
                self.root,
                f"{len(empty)} class folder(s) in {split}/ hold no images "
                f"(.jpg/.jpeg/.png/...): {empty[:5]}",
            )
        return dataset

    def build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        self.check_classes()
        val, train = self.folder("val"), self.folder("train")
        verify = self.hparams.verify
        if verify:
            check = quick_image_check if verify == "quick" else NamedImageLoader("ImageNet")
            for split, dataset in (("train", train), ("val", val)):
                files = [(Path(p), check) for p, _ in dataset.samples]
                verify_files("ImageNet", files, f"{split}/ images")
        return train, val, val


class NamedImageLoader:
    """ImageFolder's loader (PIL, RGB) whose decoder errors name the file and the dataset; a
    class rather than a closure so that DataLoader workers can pickle it."""

    def __init__(self, dataset: str) -> None:
        self.dataset = dataset

    def __call__(self, path: str | Path) -> Image.Image:
        return read_named(self.dataset, path, _load_rgb)


def _load_rgb(path: str | Path) -> Image.Image:
    with Image.open(path) as img:
        return img.convert("RGB")  # decodes the whole file (greyscale and CMYK become RGB)


__all__ = [
    "CIFAR10DataModule",
    "ClassificationDataModule",
    "DigitsDataModule",
    "ImageArrayDataset",
    "ImageNetDataModule",
]
