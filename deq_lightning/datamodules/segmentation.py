"""Semantic segmentation data: synthetic digit scenes (the embedded default) and Cityscapes.

Both DataModules serve ``(image float (3, H, W), label int64 (H, W))`` batches, with ``255``
marking pixels that count neither in the loss nor in the metrics. They expose, right after
``__init__`` and without touching the disk, what the model, the task and the prediction writer
need: ``num_classes``, ``in_channels``, ``class_names``, ``palette`` (one RGB colour per class),
``label_ids`` (train id -> the id the dataset's benchmark expects, or ``None``), ``class_weights``
(the loss's per-class weights, or ``None``) and ``mean``/``std`` (the input normalisation).
``batch_size`` and ``eval_batch_size`` are global; each process loads its share.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from deq_lightning.datamodules.checks import (
    check_train_size,
    check_verify_mode,
    quick_image_check,
    verify_files,
)
from deq_lightning.datamodules.common import DatasetLayoutError, eval_loader, per_device_batch_size
from deq_lightning.datamodules.segmentation_io import (
    CITYSCAPES_CLASS_NAMES,
    CITYSCAPES_CLASS_WEIGHTS,
    CITYSCAPES_LABEL_IDS,
    CITYSCAPES_LAYOUT,
    CITYSCAPES_PALETTE,
    IGNORE_INDEX,
    IMAGENET_MEAN,
    IMAGENET_STD,
    CityscapesSegmentation,
    ImageFiles,
    RandomScaleCropFlip,
    cityscapes_pairs,
    colorize,
    label_ids_to_train_ids,
    normalize,
    read_label_ids,
    read_rgb,
    train_ids_to_label_ids,
)


def check_class_weights(weights: Sequence[float] | None, num_classes: int) -> list[float] | None:
    if weights is None:
        return None
    weights = [float(w) for w in weights]
    if len(weights) != num_classes or min(weights) <= 0:
        raise ValueError(
            f"data.class_weights needs {num_classes} positive numbers (one per class), "
            f"got {weights}; or set it to null for an unweighted loss"
        )
    return weights


class SegmentationDataModule(pl.LightningDataModule):
    """Loaders shared by the datasets below; subclasses fill the splits in ``build_splits``."""

    num_classes: int
    in_channels = 3
    class_names: tuple[str, ...]
    palette: np.ndarray
    label_ids: tuple[int, ...] | None = None
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __init__(self) -> None:
        super().__init__()
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        self.train_batch = per_device_batch_size(hp.batch_size, self.trainer)
        try:
            self.eval_batch = per_device_batch_size(
                hp.eval_batch_size or hp.batch_size, self.trainer
            )
        except ValueError as e:
            key = "data.eval_batch_size" if hp.eval_batch_size else "data.batch_size"
            raise ValueError(str(e).replace("data.batch_size", key)) from None
        if self.train_set is None:
            self.train_set, self.val_set, self.test_set = self.build_splits()
        if stage == "fit":  # a fit (a bare setup() only builds the splits)
            check_train_size(len(self.train_set), hp.batch_size, type(self).__name__)

    def build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        raise NotImplementedError

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        workers = self.hparams.num_workers
        return DataLoader(
            self.train_set,
            batch_size=self.train_batch,
            shuffle=True,
            # A last batch of one sample breaks BatchNorm in train mode.
            drop_last=len(self.train_set) > self.train_batch,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def eval_dataloader(self, dataset: Dataset | None) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        # Each image is seen by exactly one rank: the summed confusion matrix is exact.
        return eval_loader(
            dataset,
            self.eval_batch,
            self.hparams.num_workers,
            self.trainer,
            pin_memory=torch.cuda.is_available(),
        )

    def val_dataloader(self) -> DataLoader:
        return self.eval_dataloader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self.eval_dataloader(self.test_set)


class CityscapesDataModule(SegmentationDataModule):
    """Cityscapes fine annotations, read from the official folder layout (no list files).

    labelIds are mapped to the 19 train ids, every other id to 255 (ignored). Training:
    :class:`RandomScaleCropFlip` (the thesis: scale 0.5-2.0 of base size 2048, crop 512x1024,
    flip). Validation and test: the full-resolution image, nothing else. ``test_split`` is
    ``val`` by default because the test split's annotations are withheld (its gtFine files are
    placeholders); predict test images for the benchmark server with ``predict_seg.py``.
    """

    num_classes = len(CITYSCAPES_CLASS_NAMES)
    class_names = CITYSCAPES_CLASS_NAMES
    palette = CITYSCAPES_PALETTE
    label_ids = CITYSCAPES_LABEL_IDS
    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def __init__(
        self,
        data_dir: str = "data/cityscapes",
        batch_size: int = 12,
        eval_batch_size: int | None = None,
        num_workers: int = 4,
        crop_size: Sequence[int] = (512, 1024),
        base_size: int = 2048,
        scale_range: Sequence[float] = (0.5, 2.0),
        flip: bool = True,
        test_split: str = "val",
        class_weights: Sequence[float] | None = CITYSCAPES_CLASS_WEIGHTS,
        verify: bool | str = False,
    ) -> None:
        check_verify_mode(verify)
        if len(crop_size) != 2 or min(crop_size) < 1:
            raise ValueError(f"data.crop_size is [height, width], got {list(crop_size)}")
        if len(scale_range) != 2 or not 0 < scale_range[0] <= scale_range[1]:
            raise ValueError(f"data.scale_range is [low, high] > 0, got {list(scale_range)}")
        if test_split not in ("val", "test"):
            raise ValueError(f"data.test_split must be 'val' or 'test', got {test_split!r}")
        super().__init__()
        self.save_hyperparameters()
        self.class_weights = check_class_weights(class_weights, self.num_classes)

    def root(self) -> Path:
        base = Path(self.hparams.data_dir).expanduser()
        nested = base / "cityscapes"
        return nested if not (base / "leftImg8bit").is_dir() and nested.is_dir() else base

    def build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        hp, root = self.hparams, self.root()
        if not root.is_dir():
            raise DatasetLayoutError(
                "Cityscapes", root, "nothing found", CITYSCAPES_LAYOUT, "data.data_dir"
            )
        augment = RandomScaleCropFlip(
            hp.crop_size, hp.base_size, hp.scale_range, self.mean, self.std, hp.flip
        )
        train = CityscapesSegmentation(
            cityscapes_pairs(root, "train"), self.mean, self.std, augment
        )
        val = CityscapesSegmentation(cityscapes_pairs(root, "val"), self.mean, self.std)
        test = (
            val
            if hp.test_split == "val"
            else CityscapesSegmentation(cityscapes_pairs(root, "test"), self.mean, self.std)
        )
        if hp.verify:
            self.verify_files([train, val] if test is val else [train, val, test], hp.verify)
        return train, val, test

    @staticmethod
    def verify_files(splits: Sequence[CityscapesSegmentation], mode: bool | str) -> None:
        """``data.verify``: every image and label of the splits, all bad files in one error
        (``"quick"``: headers and checksums; true: decode each file as training would)."""
        files: dict[Path, object] = {}
        for split in splits:
            for image, label in split.pairs:
                files[image] = quick_image_check if mode == "quick" else read_rgb
                files[label] = quick_image_check if mode == "quick" else read_label_ids
        verify_files("Cityscapes", list(files.items()), "its splits")


# ----------------------------------------------------------------------------------------------
# Synthetic digit scenes: the embedded default (scikit-learn digits on scikit-image textures)
# ----------------------------------------------------------------------------------------------

# scikit-image sample images bundled with the package (no download): the scene backgrounds.
BACKGROUNDS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "brick", "grass", "gravel")
# Glyph alpha >= this is the digit; between EDGE_ALPHA and this, an ignored (mixed) pixel.
CORE_ALPHA, EDGE_ALPHA = 0.5, 0.15


def load_backgrounds() -> list[np.ndarray]:
    """The bundled sample images as float RGB arrays in [0, 1]."""
    from skimage import data

    out = []
    for name in BACKGROUNDS:
        img = np.asarray(getattr(data, name)(), dtype=np.float32) / 255.0
        out.append(np.repeat(img[..., None], 3, axis=2) if img.ndim == 2 else img[..., :3])
    return out


def render_scenes(
    n: int,
    image_size: int,
    glyphs: np.ndarray,
    glyph_classes: np.ndarray,
    backgrounds: Sequence[np.ndarray],
    rng: np.random.Generator,
    objects: Sequence[int],
    glyph_size: Sequence[int],
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` scenes: a dimmed texture crop with handwritten digits painted on it in bright colours.

    Returns uint8 images ``(n, S, S, 3)`` and labels ``(n, S, S)``: 0 for the background, the
    class of the digit where its (upsampled) glyph is opaque, 255 on its soft edge where digit and
    background mix. The masks are exact: they come from the alpha used to paint. Digits do not
    overlap (a digit that finds no free place after a few tries is left out).
    """
    s = image_size
    # Every glyph at every size, resized once (bilinear, alpha in [0, 1]).
    sizes = range(glyph_size[0], glyph_size[1] + 1)
    alphas = {
        g: F.interpolate(torch.from_numpy(glyphs)[:, None], size=(g, g), mode="bilinear")[:, 0]
        .clamp(0, 1)
        .numpy()
        for g in sizes
    }
    images = np.empty((n, s, s, 3), dtype=np.uint8)
    labels = np.zeros((n, s, s), dtype=np.uint8)
    for i in range(n):
        bg = backgrounds[rng.integers(len(backgrounds))]
        # A random crop of k * s pixels, shrunk to s x s by averaging k x k blocks.
        k = int(rng.integers(1, max(1, min(4, min(bg.shape[:2]) // s)) + 1))
        top, left = (int(rng.integers(0, d - k * s + 1)) for d in bg.shape[:2])
        window = bg[top : top + k * s, left : left + k * s]
        crop = sum(window[a::k, b::k] for a in range(k) for b in range(k)) / (k * k)
        # Dim and squeeze the texture so digits always stand out in brightness; their class
        # still has to be read from their shape (colours are random).
        img = (0.05 + 0.4 * crop).astype(np.float32)
        lab = labels[i]
        taken = np.zeros((s, s), dtype=bool)
        for _ in range(int(rng.integers(objects[0], objects[1] + 1))):
            j = int(rng.integers(len(glyphs)))
            g = int(rng.integers(glyph_size[0], glyph_size[1] + 1))
            alpha = alphas[g][j]
            for _try in range(10):
                y, x = (int(v) for v in rng.integers(0, s - g + 1, size=2))
                if not taken[y : y + g, x : x + g].any():
                    break
            else:
                continue
            taken[y : y + g, x : x + g] = True
            colour = rng.uniform(0.6, 1.0, size=3).astype(np.float32)
            colour[rng.integers(3)] = rng.uniform(0.0, 0.4)  # saturated, random hue
            a = alpha[..., None]
            img[y : y + g, x : x + g] = img[y : y + g, x : x + g] * (1 - a) + colour * a
            patch = lab[y : y + g, x : x + g]
            patch[alpha > EDGE_ALPHA] = IGNORE_INDEX
            patch[alpha >= CORE_ALPHA] = glyph_classes[j]
        images[i] = np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)
    return images, labels


class SceneDataset(Dataset):
    """In-memory uint8 scenes and labels, normalised on the fly."""

    def __init__(
        self, images: np.ndarray, labels: np.ndarray, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        self.labels = torch.from_numpy(labels)
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return normalize(self.images[i], self.mean, self.std), self.labels[i].long()


class SyntheticSegDataModule(SegmentationDataModule):
    """Scenes of handwritten digits (scikit-learn's ``load_digits``) painted on textures
    (scikit-image's sample images), with exact masks; nothing to download.

    Classes: ``background`` and one per entry of ``digits``. Each scene holds ``objects`` (min,
    max) digits of ``glyph_size`` (min, max) pixels; the glyphs of the three splits come from
    disjoint sets of handwritten samples, so test digits were never seen in training. Everything
    is drawn from ``seed`` (keep it fixed to compare runs: it picks the test set).
    """

    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)

    def __init__(
        self,
        batch_size: int = 32,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        image_size: int = 32,
        digits: Sequence[int] = (0, 1, 2, 3, 4),
        n_train: int = 3000,
        n_val: int = 300,
        n_test: int = 300,
        objects: Sequence[int] = (1, 3),
        glyph_size: Sequence[int] = (12, 18),
        class_weights: Sequence[float] | None = None,
    ) -> None:
        digits = [int(d) for d in digits]
        if not digits or len(set(digits)) != len(digits) or not set(digits) <= set(range(10)):
            raise ValueError(f"data.digits must be distinct digits 0..9, got {digits}")
        if not 16 <= image_size <= 256:
            raise ValueError(f"data.image_size must be in [16, 256], got {image_size}")
        if not 1 <= objects[0] <= objects[1]:
            raise ValueError(f"data.objects is [min, max] with 1 <= min <= max, got {objects}")
        if not 4 <= glyph_size[0] <= glyph_size[1] <= image_size:
            raise ValueError(
                f"data.glyph_size is [min, max] pixels with 4 <= min <= max <= data.image_size "
                f"({image_size}), got {list(glyph_size)}"
            )
        if min(n_train, n_val, n_test) < 1:
            raise ValueError("data.n_train, data.n_val and data.n_test must be >= 1")
        super().__init__()
        self.save_hyperparameters()
        self.num_classes = len(digits) + 1
        self.class_names = ("background", *(f"digit_{d}" for d in digits))
        self.palette = synthetic_palette(self.num_classes)
        self.class_weights = check_class_weights(class_weights, self.num_classes)

    def build_splits(self) -> tuple[Dataset, Dataset, Dataset]:
        from sklearn.datasets import load_digits

        hp = self.hparams
        rng = np.random.default_rng(hp.seed)
        images, targets = load_digits(return_X_y=True)
        keep = np.isin(targets, hp.digits)
        glyphs = (images[keep].reshape(-1, 8, 8) / 16.0).astype(np.float32)
        classes = np.array([hp.digits.index(d) + 1 for d in targets[keep]], dtype=np.uint8)
        # Disjoint glyph pools for train / val / test (70 / 15 / 15 %).
        order = rng.permutation(len(glyphs))
        cut = [int(0.7 * len(order)), int(0.85 * len(order))]
        pools = np.split(order, cut)
        backgrounds = load_backgrounds()
        splits = []
        for pool, n in zip(pools, (hp.n_train, hp.n_val, hp.n_test)):
            x, y = render_scenes(
                n,
                hp.image_size,
                glyphs[pool],
                classes[pool],
                backgrounds,
                rng,
                hp.objects,
                hp.glyph_size,
            )
            splits.append(SceneDataset(x, y, self.mean, self.std))
        return tuple(splits)


def synthetic_palette(num_classes: int) -> np.ndarray:
    """Black background, then evenly spaced saturated hues."""
    import colorsys

    colours = [(0, 0, 0)]
    for k in range(num_classes - 1):
        r, g, b = colorsys.hsv_to_rgb(k / max(1, num_classes - 1), 0.9, 1.0)
        colours.append((round(255 * r), round(255 * g), round(255 * b)))
    return np.array(colours, dtype=np.uint8)


# Re-exported: the tasks, callbacks and prediction read labels and images from here.
__all__ = [
    "CITYSCAPES_CLASS_NAMES",
    "CITYSCAPES_CLASS_WEIGHTS",
    "CITYSCAPES_LABEL_IDS",
    "CITYSCAPES_PALETTE",
    "IGNORE_INDEX",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "CityscapesDataModule",
    "CityscapesSegmentation",
    "ImageFiles",
    "RandomScaleCropFlip",
    "SegmentationDataModule",
    "SyntheticSegDataModule",
    "colorize",
    "label_ids_to_train_ids",
    "train_ids_to_label_ids",
]
