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
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from torchvision.datasets import Cityscapes

from deq_lightning.datamodules.checks import (
    check_train_size,
    check_verify_mode,
    quick_image_check,
    read_named,
    verify_files,
)
from deq_lightning.datamodules.common import DatasetLayoutError, eval_loader, per_device_batch_size

IGNORE_INDEX = 255

# ----------------------------------------------------------------------------------------------
# Cityscapes labels: the official table (cityscapesScripts labels.py, as torchvision ships it)
# ----------------------------------------------------------------------------------------------

# The 19 evaluated classes in train-id order (road, sidewalk, ..., bicycle).
_EVALUATED = sorted(
    (c for c in Cityscapes.classes if 0 <= c.train_id < IGNORE_INDEX), key=lambda c: c.train_id
)
CITYSCAPES_CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in _EVALUATED)
CITYSCAPES_LABEL_IDS: tuple[int, ...] = tuple(c.id for c in _EVALUATED)
CITYSCAPES_PALETTE = np.array([c.color for c in _EVALUATED], dtype=np.uint8)
# Loss weights per train id of HRNet's Cityscapes loader, which MDEQ-Vision's segmentation
# training uses (HRNet-Semantic-Segmentation lib/datasets/cityscapes.py, ``class_weights``).
CITYSCAPES_CLASS_WEIGHTS = (
    0.8373, 0.918, 0.866, 1.0345, 1.0166, 0.9969, 0.9754, 1.0489, 0.8786, 1.0023,
    0.9539, 0.9843, 1.1116, 0.9037, 1.0865, 1.0955, 1.0865, 1.1529, 1.0507,
)  # fmt: skip
# Normalisation of the reference (ImageNet statistics on RGB in [0, 1]; base_dataset.py).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def label_id_lut() -> np.ndarray:
    """A 256-entry table: Cityscapes labelId -> train id (0..18), 255 for every other id."""
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for train_id, label_id in enumerate(CITYSCAPES_LABEL_IDS):
        lut[label_id] = train_id
    return lut


_LABEL_ID_LUT = label_id_lut()


def label_ids_to_train_ids(label_ids: np.ndarray) -> np.ndarray:
    """``*_gtFine_labelIds.png`` values (0..33) -> train ids (0..18, 255 = ignored)."""
    label_ids = np.asarray(label_ids)
    if label_ids.dtype != np.uint8:
        if label_ids.size and (label_ids.min() < 0 or label_ids.max() > 255):
            raise ValueError(
                f"Cityscapes label ids are 0..33, got values {label_ids.min()}..{label_ids.max()}"
            )
        label_ids = label_ids.astype(np.uint8)
    return _LABEL_ID_LUT[label_ids]


def train_ids_to_label_ids(train_ids: np.ndarray, label_ids: Sequence[int]) -> np.ndarray:
    """Predicted train ids -> the dataset's own ids (Cityscapes benchmark PNGs); 255 -> 0."""
    table = np.zeros(256, dtype=np.uint8)
    table[: len(label_ids)] = label_ids
    return table[np.asarray(train_ids, dtype=np.uint8)]


def colorize(train_ids: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """``(H, W)`` train ids -> ``(H, W, 3)`` uint8 colours; ignored/unknown ids are black."""
    table = np.zeros((256, 3), dtype=np.uint8)
    table[: len(palette)] = palette
    return table[np.asarray(train_ids, dtype=np.uint8)]


def normalize(image: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """uint8 RGB ``(3, H, W)`` -> float, standardised per channel."""
    x = image.float().div_(255)
    m = torch.tensor(mean, dtype=x.dtype).view(3, 1, 1)
    s = torch.tensor(std, dtype=x.dtype).view(3, 1, 1)
    return x.sub_(m).div_(s)


# ----------------------------------------------------------------------------------------------
# Training augmentation (the thesis: random scale, crop, flip)
# ----------------------------------------------------------------------------------------------


def resized_shape(h: int, w: int, long_side: int) -> tuple[int, int]:
    """The size with the longer side set to ``long_side``, aspect ratio kept."""
    if h > w:
        return long_side, max(1, int(w * long_side / h + 0.5))
    return max(1, int(h * long_side / w + 0.5)), long_side


class RandomScaleCropFlip:
    """Resize so the longer side is ``base_size x s`` (``s ~ U[scale_range]``), pad to the crop
    (image with black, label with 255), take a random ``crop_size`` (h, w) window, flip
    horizontally with probability 1/2, and normalise.

    Reference (``base_dataset.py:gen_sample``): scale ``0.5 + randint(0, 16) / 10`` of base size
    2048, crop 512x1024, flip. Randomness comes from torch's global generator, which Lightning
    seeds per worker.
    """

    def __init__(
        self,
        crop_size: Sequence[int],
        base_size: int,
        scale_range: Sequence[float],
        mean: Sequence[float],
        std: Sequence[float],
        flip: bool = True,
    ) -> None:
        self.crop_h, self.crop_w = (int(s) for s in crop_size)
        self.base_size = base_size
        self.scale_lo, self.scale_hi = (float(s) for s in scale_range)
        self.mean, self.std, self.flip = tuple(mean), tuple(std), flip

    def __call__(self, image: Tensor, label: Tensor) -> tuple[Tensor, Tensor]:
        scale = self.scale_lo + (self.scale_hi - self.scale_lo) * torch.rand(()).item()
        h, w = resized_shape(*image.shape[-2:], int(self.base_size * scale + 0.5))
        image = F.interpolate(
            image[None].float(), size=(h, w), mode="bilinear", align_corners=False, antialias=True
        )[0]
        label = F.interpolate(label[None, None].float(), size=(h, w), mode="nearest-exact")[0, 0]
        pad_h, pad_w = max(self.crop_h - h, 0), max(self.crop_w - w, 0)
        if pad_h or pad_w:
            image = F.pad(image, (0, pad_w, 0, pad_h), value=0.0)
            label = F.pad(label, (0, pad_w, 0, pad_h), value=float(IGNORE_INDEX))
        top = int(torch.randint(0, image.shape[-2] - self.crop_h + 1, ()))
        left = int(torch.randint(0, image.shape[-1] - self.crop_w + 1, ()))
        image = image[:, top : top + self.crop_h, left : left + self.crop_w]
        label = label[top : top + self.crop_h, left : left + self.crop_w]
        if self.flip and torch.rand(()).item() < 0.5:
            image, label = image.flip(-1), label.flip(-1)
        image = image.clamp(0, 255).round().to(torch.uint8)
        return normalize(image, self.mean, self.std), label.long()


# ----------------------------------------------------------------------------------------------
# Cityscapes: leftImg8bit + gtFine in the official layout, no list files
# ----------------------------------------------------------------------------------------------

CITYSCAPES_LAYOUT = """\
<data_dir>/leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
<data_dir>/gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_labelIds.png
  (leftImg8bit_trainvaltest.zip and gtFine_trainvaltest.zip from cityscapes-dataset.com,
   unpacked into the same folder; only the *_labelIds.png files of gtFine are read)"""

IMAGE_SUFFIX = "_leftImg8bit.png"
LABEL_SUFFIX = "_gtFine_labelIds.png"


def cityscapes_pairs(root: Path, split: str) -> list[tuple[Path, Path]]:
    """Sorted ``(image, labelIds)`` paths of one split; a clear error for anything missing."""

    def error(problem: str) -> DatasetLayoutError:
        return DatasetLayoutError("Cityscapes", root, problem, CITYSCAPES_LAYOUT, "data.data_dir")

    image_dir = root / "leftImg8bit" / split
    if not image_dir.is_dir():
        raise error(f"no leftImg8bit/{split} folder")
    images = sorted(image_dir.glob(f"*/*{IMAGE_SUFFIX}"))
    if not images:
        raise error(f"leftImg8bit/{split} holds no <city>/*{IMAGE_SUFFIX} files")
    pairs, missing = [], []
    for image in images:
        stem = image.name[: -len(IMAGE_SUFFIX)]
        label = root / "gtFine" / split / image.parent.name / f"{stem}{LABEL_SUFFIX}"
        (pairs if label.is_file() else missing).append((image, label))
    if missing:
        shown = ", ".join(str(lbl.relative_to(root)) for _, lbl in missing[:3])
        raise error(
            f"{len(missing)} of {len(images)} {split} images have no label file (e.g. {shown})"
        )
    return pairs


def read_label_ids(path: Path) -> np.ndarray:
    """A ``*_labelIds.png`` as a ``(H, W)`` uint8 array; refuses colour images."""
    with Image.open(path) as im:
        if im.mode not in ("L", "P", "I", "I;16"):
            raise ValueError(
                f"{path} is a {im.mode} image; a *{LABEL_SUFFIX} file holds one label id per "
                "pixel (single channel). Is this a *_gtFine_color.png renamed?"
            )
        return np.asarray(im.convert("L") if im.mode == "P" else im).astype(np.uint8)


def read_rgb(path: Path) -> Tensor:
    """An image file as a uint8 ``(3, H, W)`` tensor."""
    with Image.open(path) as im:
        return torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).contiguous()


class CityscapesSegmentation(Dataset):
    """``(image, train-id label)`` pairs of one split; ``transform`` augments both together."""

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path]],
        mean: Sequence[float],
        std: Sequence[float],
        transform: RandomScaleCropFlip | None = None,
    ) -> None:
        self.pairs = list(pairs)
        self.mean, self.std, self.transform = tuple(mean), tuple(std), transform

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        image_path, label_path = self.pairs[i]
        image = read_named("Cityscapes", image_path, read_rgb)
        label_ids = read_named("Cityscapes", label_path, read_label_ids)
        label = torch.from_numpy(label_ids_to_train_ids(label_ids))
        if image.shape[-2:] != label.shape:
            raise ValueError(
                f"{image_path.name} is {tuple(image.shape[-2:])} but its label "
                f"{label_path.name} is {tuple(label.shape)}; image and label must have one size"
            )
        if self.transform is not None:
            return self.transform(image, label)
        return normalize(image, self.mean, self.std), label.long()


IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".tif", ".tiff", ".webp")


class ImageFiles(Dataset):
    """Every image under ``folder`` (recursively, sorted) as ``(network input, name)``.

    ``name`` is the path relative to ``folder`` without the extension; the prediction writer
    mirrors it. For predicting on the user's own images (``predict_seg.py``).
    """

    def __init__(self, folder: str | Path, mean: Sequence[float], std: Sequence[float]) -> None:
        self.folder = Path(folder).expanduser()
        if not self.folder.is_dir():
            raise FileNotFoundError(f"input_dir={self.folder} is not a folder")
        self.files = sorted(
            p for p in self.folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not self.files:
            raise FileNotFoundError(
                f"no images ({', '.join(IMAGE_EXTENSIONS)}) under input_dir={self.folder}"
            )
        self.mean, self.std = tuple(mean), tuple(std)

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, str]:
        path = self.files[i]
        name = path.relative_to(self.folder).with_suffix("").as_posix()
        return normalize(read_rgb(path), self.mean, self.std), name


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


__all__ = [
    "CITYSCAPES_CLASS_NAMES",
    "CITYSCAPES_CLASS_WEIGHTS",
    "CITYSCAPES_LABEL_IDS",
    "CITYSCAPES_PALETTE",
    "IGNORE_INDEX",
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
