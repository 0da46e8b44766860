"""Segmentation images and labels: the Cityscapes label table and its id conversions, colour
maps, normalisation, the training augmentation (random scale, crop and flip), the Cityscapes
file pairs in their official layout, and a folder of unlabelled images for prediction.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets import Cityscapes

from deq_lightning.datamodules.checks import read_named
from deq_lightning.datamodules.common import DatasetLayoutError

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
