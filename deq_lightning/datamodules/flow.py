"""Optical-flow data: synthetic pairs from scikit-image photos (the embedded default), FlyingChairs,
FlyingThings3D, MPI-Sintel, KITTI-2015, HD1K and the thesis's Sintel fine-tuning mix.

Every sample is a dict: ``image1``/``image2`` ``(3, H, W)`` float32 in ``[0, 255]``, ``flow``
``(2, H, W)`` float32 in pixels (u right, v down), ``valid`` ``(H, W)`` float32 (1 where the
ground truth counts: KITTI/HD1K are sparse; dense sets mark ``|u|, |v| < 1000`` as in the thesis).
Unlabelled benchmark frames (``predict_dataloader``) carry ``name`` (the submission file's
relative path) and ``new_sequence`` (reset a warm start there) instead of flow and valid.

The real datasets live under one ``data_dir`` with the folder names of the thesis repo
(locuslab/deq-flow ``core/datasets.py``, which reads ``datasets/``); torchvision's names
(``FlyingChairs``, ``KittiFlow``, ``hd1k``) are accepted too. We index the folders ourselves
rather than through ``torchvision.datasets``: the thesis's layout differs in names, and the
Sintel/KITTI submissions need each frame's scene and id, which torchvision does not expose.
Training batches are random crops, so they stack; evaluation runs on whole frames one pair per
batch, as the benchmarks' sizes differ (KITTI) and the model pads them itself.

Augmentation follows the thesis repo (RAFT's augmentor; parameters per stage from
``fetch_dataloader``), reimplemented in torch: colour jitter, an occlusion eraser, random scale
and stretch, flips and a crop; the sparse variant (KITTI, HD1K) rescales flow by moving each valid
pixel instead of interpolating. Random draws use torch's global generator, which PyTorch seeds
differently in every DataLoader worker and epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from glob import glob
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from torchvision.transforms import v2

from deq_lightning.datamodules.checks import (
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
from deq_lightning.datamodules.flow_io import (
    FlowFormatError,
    check_flow_header,
    read_flow,
    read_image,
)

# ----------------------------------------------------------------------------------------------
# On-disk layouts and indexing
# ----------------------------------------------------------------------------------------------

FOLDERS = {  # first name: the thesis repo's; later ones: torchvision's
    "chairs": ("FlyingChairs_release", "FlyingChairs"),
    "things": ("FlyingThings3D",),
    "sintel": ("Sintel",),
    "kitti": ("KITTI", "KittiFlow"),
    "hd1k": ("HD1k", "hd1k"),
}

LAYOUTS = {
    "chairs": """\
<data_dir>/FlyingChairs_release/         (or FlyingChairs/)
    data/00001_img1.ppm, data/00001_img2.ppm, data/00001_flow.flo, ...
    chairs_split.txt                     one line per pair: 1 = train, 2 = validation; also
                                         accepted as FlyingChairs_train_val.txt (dataset page)""",
    "things": """\
<data_dir>/FlyingThings3D/
    frames_cleanpass/{TRAIN,TEST}/<A|B|C>/<seq>/left/0006.png ...
    frames_finalpass/{TRAIN,TEST}/<A|B|C>/<seq>/left/0006.png ...
    optical_flow/{TRAIN,TEST}/<A|B|C>/<seq>/{into_future,into_past}/left/OpticalFlowInto*.pfm""",
    "sintel": """\
<data_dir>/Sintel/
    training/{clean,final}/<scene>/frame_0001.png ...
    training/flow/<scene>/frame_0001.flo ...    (flow from frame i to frame i+1)
    test/{clean,final}/<scene>/frame_0001.png ...""",
    "kitti": """\
<data_dir>/KITTI/                        (or KittiFlow/)
    training/image_2/000000_10.png, 000000_11.png, ...
    training/flow_occ/000000_10.png, ...      16-bit PNG flow with a valid channel
    testing/image_2/000000_10.png, 000000_11.png, ...""",
    "hd1k": """\
<data_dir>/HD1k/                         (or hd1k/)
    hd1k_input/image_2/000000_0000.png, 000000_0001.png, ...   <sequence>_<frame>
    hd1k_flow_gt/flow_occ/000000_0000.png, ...                 KITTI-format 16-bit PNG""",
}


@dataclass(frozen=True)
class FlowSample:
    """One frame pair on disk."""

    image1: Path
    image2: Path
    flow: Path | None  # None for unlabelled benchmark frames
    name: str  # unlabelled: the submission file's relative path
    new_sequence: bool = True


def dataset_root(data_dir: str | Path, dataset: str, key: str = "data.data_dir") -> Path:
    """The folder of ``dataset`` under ``data_dir`` (thesis name first, then torchvision's)."""
    base = Path(data_dir).expanduser()
    for name in FOLDERS[dataset]:
        if (base / name).is_dir():
            return base / name
    names = " or ".join(FOLDERS[dataset])
    raise DatasetLayoutError(dataset, base, f"no {names} folder", LAYOUTS[dataset], key)


def _layout_error(dataset: str, root: Path, problem: str) -> DatasetLayoutError:
    return DatasetLayoutError(dataset, root, problem, LAYOUTS[dataset], "data.data_dir")


def _sorted(pattern: Path) -> list[Path]:
    return [Path(p) for p in sorted(glob(str(pattern)))]


def chairs_index(root: Path, split: str) -> list[FlowSample]:
    """FlyingChairs pairs of ``split`` ('train' or 'val') by the split file."""
    images, flows = _sorted(root / "data" / "*.ppm"), _sorted(root / "data" / "*.flo")
    if not flows:
        raise _layout_error("chairs", root, "no data/*.flo files")
    if len(images) != 2 * len(flows):
        raise _layout_error(
            "chairs", root, f"{len(images)} .ppm images for {len(flows)} .flo flows (want 2 each)"
        )
    split_file = next(
        (
            root / n
            for n in ("chairs_split.txt", "FlyingChairs_train_val.txt")
            if (root / n).is_file()
        ),
        None,
    )
    if split_file is None:
        raise _layout_error("chairs", root, "no chairs_split.txt (the train/validation split)")
    ids = np.loadtxt(split_file, dtype=np.int64, ndmin=1)
    if len(ids) != len(flows) or not np.isin(ids, (1, 2)).all():
        raise _layout_error(
            "chairs",
            root,
            f"{split_file.name} must hold one 1 or 2 per pair ({len(flows)} pairs, "
            f"{len(ids)} lines)",
        )
    want = {"train": 1, "val": 2}[split]
    return [
        FlowSample(images[2 * i], images[2 * i + 1], flows[i], flows[i].stem)
        for i in range(len(flows))
        if ids[i] == want
    ]


def things_index(root: Path, split: str, pass_name: str) -> list[FlowSample]:
    """FlyingThings3D left-camera pairs of ``split`` ('TRAIN'/'TEST'), both time directions."""
    frames = f"frames_{pass_name}pass"
    seq_dirs = _sorted(root / frames / split / "*" / "*")
    if not seq_dirs:
        raise _layout_error("things", root, f"no {frames}/{split}/<A|B|C>/<seq> folders")
    samples = []
    for seq in seq_dirs:
        rel = seq.relative_to(root / frames)
        images = _sorted(seq / "left" / "*.png")
        for direction in ("into_future", "into_past"):
            flow_dir = root / "optical_flow" / rel / direction / "left"
            flows = _sorted(flow_dir / "*.pfm")
            if len(flows) != len(images):
                raise _layout_error(
                    "things",
                    root,
                    f"{len(images)} images in {frames}/{rel}/left but {len(flows)} flows in "
                    f"optical_flow/{rel}/{direction}/left",
                )
            for i in range(len(flows) - 1):
                if direction == "into_future":
                    pair = (images[i], images[i + 1], flows[i])
                else:
                    pair = (images[i + 1], images[i], flows[i + 1])
                samples.append(FlowSample(*pair, f"{rel}/{direction}/{pair[0].stem}"))
    return samples


def sintel_index(root: Path, split: str, pass_name: str) -> list[FlowSample]:
    """Sintel pairs of consecutive frames within each scene; ``split`` 'training' or 'test'."""
    image_root = root / split / pass_name
    scenes = sorted(p for p in image_root.glob("*") if p.is_dir())
    if not scenes:
        raise _layout_error("sintel", root, f"no scene folders in {split}/{pass_name}")
    samples = []
    for scene in scenes:
        images = _sorted(scene / "*.png")
        flows: list[Path | None] = [None] * (len(images) - 1)
        if split == "training":
            flows = _sorted(root / split / "flow" / scene.name / "*.flo")
            if len(flows) != len(images) - 1:
                raise _layout_error(
                    "sintel",
                    root,
                    f"{len(images)} frames in {split}/{pass_name}/{scene.name} need "
                    f"{len(images) - 1} flows in {split}/flow/{scene.name}, found {len(flows)}",
                )
        for i in range(len(images) - 1):
            name = f"{pass_name}/{scene.name}/frame{i + 1:04d}.flo"  # the submission's naming
            samples.append(FlowSample(images[i], images[i + 1], flows[i], name, i == 0))
    return samples


def kitti_index(root: Path, split: str) -> list[FlowSample]:
    """KITTI-2015 pairs (``*_10.png``, ``*_11.png``); ``split`` 'training' or 'testing'."""
    first = _sorted(root / split / "image_2" / "*_10.png")
    second = _sorted(root / split / "image_2" / "*_11.png")
    if not first or len(first) != len(second):
        raise _layout_error(
            "kitti", root, f"{len(first)} *_10.png and {len(second)} *_11.png in {split}/image_2"
        )
    flows: list[Path | None] = [None] * len(first)
    if split == "training":
        flows = _sorted(root / split / "flow_occ" / "*_10.png")
        if len(flows) != len(first):
            raise _layout_error(
                "kitti", root, f"{len(first)} image pairs but {len(flows)} training/flow_occ files"
            )
    return [FlowSample(a, b, f, a.name) for a, b, f in zip(first, second, flows)]


def hd1k_index(root: Path) -> list[FlowSample]:
    """HD1K pairs of consecutive frames within each sequence."""
    flows_all = _sorted(root / "hd1k_flow_gt" / "flow_occ" / "*.png")
    if not flows_all:
        raise _layout_error("hd1k", root, "no hd1k_flow_gt/flow_occ/*.png files")
    samples = []
    for seq in sorted({p.name.split("_")[0] for p in flows_all}):
        flows = _sorted(root / "hd1k_flow_gt" / "flow_occ" / f"{seq}_*.png")
        images = _sorted(root / "hd1k_input" / "image_2" / f"{seq}_*.png")
        if len(images) < len(flows):
            raise _layout_error(
                "hd1k", root, f"sequence {seq}: {len(flows)} flows but {len(images)} images"
            )
        for i in range(len(flows) - 1):
            samples.append(FlowSample(images[i], images[i + 1], flows[i], flows[i].stem, i == 0))
    return samples


# ----------------------------------------------------------------------------------------------
# Augmentation
# ----------------------------------------------------------------------------------------------


def _rand() -> float:
    return float(torch.rand(()))


def _uniform(lo: float, hi: float) -> float:
    return lo + (hi - lo) * _rand()


def _randint(lo: int, hi: int) -> int:
    """Uniform integer in ``[lo, hi)``."""
    return int(torch.randint(lo, hi, ()))


def _resize(x: Tensor, size: tuple[int, int]) -> Tensor:
    return F.interpolate(x[None], size=size, mode="bilinear", align_corners=False)[0]


def resize_sparse_flow(flow: Tensor, valid: Tensor, size: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """Rescale sparse flow without mixing valid and invalid pixels: move each valid pixel's
    centre to the new grid (nearest pixel) and scale its vector; the rest stay invalid."""
    h, w = valid.shape
    nh, nw = size
    fy, fx = nh / h, nw / w
    ys, xs = torch.nonzero(valid >= 0.5, as_tuple=True)
    yy = torch.round((ys + 0.5) * fy - 0.5).long()
    xx = torch.round((xs + 0.5) * fx - 0.5).long()
    keep = (xx >= 0) & (xx < nw) & (yy >= 0) & (yy < nh)
    new_flow = flow.new_zeros(2, nh, nw)
    new_valid = valid.new_zeros(nh, nw)
    ys, xs, yy, xx = ys[keep], xs[keep], yy[keep], xx[keep]
    new_flow[0, yy, xx] = flow[0, ys, xs] * fx
    new_flow[1, yy, xx] = flow[1, ys, xs] * fy
    new_valid[yy, xx] = 1.0
    return new_flow, new_valid


class FlowAugmentor:
    """Random photometric and spatial augmentation of a training pair (thesis repo settings).

    Dense (Chairs, Things, Sintel): colour jitter 0.4/0.4/0.4/hue 0.5/pi, per frame with
    probability 0.2 and shared otherwise; an eraser (p 0.5) filling 1-2 boxes of 50-99 px in frame
    2 with its mean colour (fake occlusions); scale ``2**U(min_scale, max_scale)`` applied with
    p 0.8, each axis stretched by ``2**U(-0.2, 0.2)`` with p 0.8, never below what the crop
    (+8 px) needs; horizontal (p 0.5) and vertical (p 0.1) flips; a random crop.
    Sparse (KITTI, HD1K): shared jitter 0.3/0.3/0.3/hue 0.3/pi, the same eraser, no stretch,
    sparse rescaling (:func:`resize_sparse_flow`), horizontal flips only, and crops that favour
    the borders (offsets drawn 20 px / 50 px beyond the image, then clamped).
    """

    def __init__(
        self,
        crop_size: Sequence[int],
        min_scale: float,
        max_scale: float,
        do_flip: bool = True,
        sparse: bool = False,
    ) -> None:
        self.crop = (int(crop_size[0]), int(crop_size[1]))
        self.min_scale, self.max_scale = min_scale, max_scale
        self.do_flip, self.sparse = do_flip, sparse
        strength, hue = (0.3, 0.3 / math.pi) if sparse else (0.4, 0.5 / math.pi)
        self.jitter = v2.ColorJitter(strength, strength, strength, hue)
        self.asymmetric_prob = 0.0 if sparse else 0.2

    def __call__(
        self, img1: Tensor, img2: Tensor, flow: Tensor, valid: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """uint8 images ``(3, H, W)``, flow ``(2, H, W)``, valid ``(H, W)`` -> float crops."""
        img1, img2 = self.color(img1, img2)
        img2 = self.erase(img2)
        return self.spatial(img1, img2, flow, valid)

    def color(self, img1: Tensor, img2: Tensor) -> tuple[Tensor, Tensor]:
        if _rand() < self.asymmetric_prob:
            return self.jitter(img1).float(), self.jitter(img2).float()
        both = self.jitter(torch.cat([img1, img2], dim=1)).float()
        return both[:, : img1.shape[1]], both[:, img1.shape[1] :]

    @staticmethod
    def erase(img2: Tensor) -> Tensor:
        if _rand() >= 0.5:
            return img2
        img2 = img2.clone()
        h, w = img2.shape[-2:]
        mean = img2.mean(dim=(1, 2), keepdim=True)
        for _ in range(_randint(1, 3)):
            x0, y0 = _randint(0, w), _randint(0, h)
            dx, dy = _randint(50, 100), _randint(50, 100)
            img2[:, y0 : y0 + dy, x0 : x0 + dx] = mean
        return img2

    def spatial(
        self, img1: Tensor, img2: Tensor, flow: Tensor, valid: Tensor
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        ch, cw = self.crop
        h, w = img1.shape[-2:]
        margin = 1 if self.sparse else 8
        floor = max((ch + margin) / h, (cw + margin) / w)
        scale = 2 ** _uniform(self.min_scale, self.max_scale)
        sx = sy = scale
        if not self.sparse and _rand() < 0.8:
            sx *= 2 ** _uniform(-0.2, 0.2)
            sy *= 2 ** _uniform(-0.2, 0.2)
        sx, sy = max(sx, floor), max(sy, floor)
        if _rand() < 0.8 or h < ch or w < cw:
            size = (round(h * sy), round(w * sx))
            img1, img2 = _resize(img1, size), _resize(img2, size)
            if self.sparse:
                flow, valid = resize_sparse_flow(flow, valid, size)
            else:
                flow = (
                    _resize(flow, size) * flow.new_tensor([size[1] / w, size[0] / h])[:, None, None]
                )
                valid = (_resize(valid[None], size)[0] > 0.99).float()
        if self.do_flip and _rand() < 0.5:
            img1, img2, flow, valid = (t.flip(-1) for t in (img1, img2, flow, valid))
            flow = flow * flow.new_tensor([-1.0, 1.0])[:, None, None]
        if self.do_flip and not self.sparse and _rand() < 0.1:
            img1, img2, flow, valid = (t.flip(-2) for t in (img1, img2, flow, valid))
            flow = flow * flow.new_tensor([1.0, -1.0])[:, None, None]
        h, w = img1.shape[-2:]
        if self.sparse:
            y0 = min(max(_randint(0, h - ch + 20), 0), h - ch)
            x0 = min(max(_randint(-50, w - cw + 50), 0), w - cw)
        else:
            y0, x0 = _randint(0, h - ch + 1), _randint(0, w - cw + 1)
        window = (slice(y0, y0 + ch), slice(x0, x0 + cw))
        return (
            img1[(slice(None), *window)],
            img2[(slice(None), *window)],
            flow[(slice(None), *window)],
            valid[window],
        )


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------


class FlowPairs(Dataset):
    """Frame pairs read from disk, optionally augmented (see the module docstring for the keys)."""

    def __init__(
        self,
        samples: Sequence[FlowSample],
        augment: FlowAugmentor | None = None,
        dataset: str = "flow",
    ) -> None:
        self.samples = list(samples)
        self.augment = augment
        self.dataset = dataset  # named in read errors (e.g. "sintel_final")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        s = self.samples[index]
        img1 = torch.from_numpy(read_named(self.dataset, s.image1, read_image)).permute(2, 0, 1)
        img2 = torch.from_numpy(read_named(self.dataset, s.image2, read_image)).permute(2, 0, 1)
        if img1.shape != img2.shape:
            raise FlowFormatError(s.image2, f"size {tuple(img2.shape[1:])} differs from {s.image1}")
        if s.flow is None:
            return {
                "image1": img1.float(),
                "image2": img2.float(),
                "name": s.name,
                "new_sequence": s.new_sequence,
            }
        flow_np, valid_np = read_named(self.dataset, s.flow, read_flow)
        flow = torch.from_numpy(np.ascontiguousarray(flow_np)).permute(2, 0, 1)
        if flow.shape[1:] != img1.shape[1:]:
            raise FlowFormatError(
                s.flow,
                f"flow of size {tuple(flow.shape[1:])} for images of {tuple(img1.shape[1:])}",
            )
        if valid_np is None:
            valid = ((flow[0].abs() < 1000) & (flow[1].abs() < 1000)).float()
        else:
            valid = torch.from_numpy(valid_np).float()
        # NaN/Inf ground truth is an invalid pixel, and its value 0: bilinear resizing in the
        # augmentation would otherwise spread it into valid neighbours, and the masked loss
        # would still be NaN (0 * NaN).
        finite = torch.isfinite(flow).all(0)
        flow = torch.where(finite, flow, 0.0)
        valid = valid * finite
        if self.augment is not None:
            img1, img2, flow, valid = self.augment(img1, img2, flow, valid)
        sample = {
            "image1": img1.float().contiguous(),
            "image2": img2.float().contiguous(),
            "flow": flow.float().contiguous(),
            "valid": valid.contiguous(),
        }
        if self.augment is not None:
            sample["index"] = index  # training batches name their files in warnings
        return sample

    def files(self) -> list[tuple[Path, str]]:
        """Every file the pairs read, once, with its kind (``image`` or ``flow``)."""
        seen: dict[Path, str] = {}
        for s in self.samples:
            seen.setdefault(s.image1, "image")
            seen.setdefault(s.image2, "image")
            if s.flow is not None:
                seen.setdefault(s.flow, "flow")
        return list(seen.items())

    def checks(self, mode: bool | str) -> list[tuple[Path, Callable[[Path], object]]]:
        """Each file with its check for ``data.verify`` (``"quick"``: headers and sizes; true:
        a full decode)."""
        full = {"image": read_image, "flow": read_flow}
        quick = {"image": quick_image_check, "flow": check_flow_header}
        checks = quick if mode == "quick" else full
        return [(path, checks[kind]) for path, kind in self.files()]


# Training parts, evaluation sets (labelled) and benchmark test sets (unlabelled), by name.
TRAIN_PARTS: dict[str, Callable[[Path], list[FlowSample]]] = {
    "chairs": lambda d: chairs_index(dataset_root(d, "chairs"), "train"),
    "things_clean": lambda d: things_index(dataset_root(d, "things"), "TRAIN", "clean"),
    "things_final": lambda d: things_index(dataset_root(d, "things"), "TRAIN", "final"),
    "sintel_clean": lambda d: sintel_index(dataset_root(d, "sintel"), "training", "clean"),
    "sintel_final": lambda d: sintel_index(dataset_root(d, "sintel"), "training", "final"),
    "kitti": lambda d: kitti_index(dataset_root(d, "kitti"), "training"),
    "hd1k": lambda d: hd1k_index(dataset_root(d, "hd1k")),
}
EVAL_SETS: dict[str, Callable[[Path], list[FlowSample]]] = {
    "chairs": lambda d: chairs_index(dataset_root(d, "chairs"), "val"),
    "things_clean": lambda d: things_index(dataset_root(d, "things"), "TEST", "clean"),
    "things_final": lambda d: things_index(dataset_root(d, "things"), "TEST", "final"),
    "sintel_clean": TRAIN_PARTS["sintel_clean"],  # Sintel and KITTI: evaluated on their
    "sintel_final": TRAIN_PARTS["sintel_final"],  # training sets, as in the thesis
    "kitti": TRAIN_PARTS["kitti"],
    "hd1k": TRAIN_PARTS["hd1k"],
}
PREDICT_SETS: dict[str, Callable[[Path], list[FlowSample]]] = {
    "sintel_test_clean": lambda d: sintel_index(dataset_root(d, "sintel"), "test", "clean"),
    "sintel_test_final": lambda d: sintel_index(dataset_root(d, "sintel"), "test", "final"),
    "kitti_test": lambda d: kitti_index(dataset_root(d, "kitti"), "testing"),
}
SPARSE_PARTS = ("kitti", "hd1k")


def check_set_names(
    val_sets: Sequence[str], predict_sets: Sequence[str], passes: Sequence[str] = ("clean",)
) -> None:
    """Reject unknown set or pass names at construction, naming the config key."""
    for key, names, known in (
        ("data.val_sets", val_sets, EVAL_SETS),
        ("data.predict_sets", predict_sets, PREDICT_SETS),
        ("data.passes", passes, {"clean": 0, "final": 0}),
    ):
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ValueError(f"{key}: unknown name(s) {unknown}; choose from {sorted(known)}")
    if not passes:
        raise ValueError("data.passes must name at least one of [clean, final]")


# ----------------------------------------------------------------------------------------------
# DataModules for the real datasets
# ----------------------------------------------------------------------------------------------


class FlowDataModule(pl.LightningDataModule):
    """Shared loaders: subclasses say which parts to train on and how to augment them.

    ``val_sets`` name the labelled sets validated (and tested) on, one dataloader each, in
    ``val_names`` order: ``chairs`` (its validation split), ``things_clean``/``things_final``
    (the TEST split), ``sintel_clean``/``sintel_final`` and ``kitti`` (their training sets, as in
    the thesis), ``hd1k``. ``predict_sets`` name unlabelled benchmark test sets for submissions:
    ``sintel_test_clean``, ``sintel_test_final``, ``kitti_test``. Evaluation and prediction load
    whole frames, ``val_batch_size`` (per device; default 1, as KITTI's frame sizes differ) at a
    time. Augmentation draws from torch's global generator: ``pl.seed_everything`` makes it
    reproducible.
    """

    def __init__(self) -> None:
        super().__init__()
        self.train_set: Dataset | None = None
        self.eval_sets: dict[str, Dataset] | None = None
        self.predict_sets: dict[str, Dataset] | None = None
        self.batch_size_per_device: int | None = None

    @property
    def val_names(self) -> list[str]:
        return list(self.hparams.val_sets)

    def train_parts(self) -> dict[str, tuple[int, FlowAugmentor]]:
        """Part name -> (repeats per epoch, augmentor)."""
        raise NotImplementedError

    def augmentor(
        self, min_scale: float, max_scale: float, do_flip: bool, sparse: bool
    ) -> FlowAugmentor:
        return FlowAugmentor(self.hparams.crop_size, min_scale, max_scale, do_flip, sparse)

    def build_train(self) -> Dataset:
        data_dir = self.hparams.data_dir
        parts: list[Dataset] = []
        for name, (repeats, augment) in self.train_parts().items():
            parts += [FlowPairs(TRAIN_PARTS[name](data_dir), augment, name)] * repeats
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)

    def sample_names(self, indices: Sequence[int]) -> list[str]:
        """The first frame of training samples ``indices`` (for warnings about a batch)."""
        out = []
        for i in indices:
            dataset, j = self.train_set, int(i)
            if isinstance(dataset, ConcatDataset):
                part = int(np.searchsorted(dataset.cumulative_sizes, j, side="right"))
                j -= dataset.cumulative_sizes[part - 1] if part else 0
                dataset = dataset.datasets[part]
            out.append(str(dataset.samples[j].image1))
        return out

    def verify_sets(self) -> None:
        """``data.verify``: every file of the training parts and evaluation sets, at setup."""
        mode = self.hparams.get("verify", False)
        if not mode:
            return
        sets = [*getattr(self.train_set, "datasets", [self.train_set])]
        sets += list((self.eval_sets or {}).values())
        files: dict[Path, Callable[[Path], object]] = {}
        for ds in sets:
            if ds is not None:
                for path, check in ds.checks(mode):
                    files.setdefault(path, check)
        verify_files(type(self).__name__, list(files.items()), "its training and evaluation sets")

    def setup(self, stage: str | None = None) -> None:
        self.batch_size_per_device = per_device_batch_size(self.hparams.batch_size, self.trainer)
        data_dir = self.hparams.data_dir
        if stage in ("fit", None) and self.train_set is None:
            self.train_set = self.build_train()
        if stage in ("fit", "validate", "test", None) and self.eval_sets is None:
            self.eval_sets = {n: FlowPairs(EVAL_SETS[n](data_dir), None, n) for n in self.val_names}
            self.verify_sets()
        if stage == "fit":
            # drop_last: a split smaller than the batch would train zero steps.
            check_train_size(
                len(self.train_set), self.hparams.batch_size, type(self).__name__, "pairs"
            )
        if stage == "predict" and self.predict_sets is None:
            names = list(self.hparams.predict_sets)
            if not names:
                raise ValueError(
                    f"{type(self).__name__} has no benchmark test sets by default; set "
                    f"data.predict_sets to some of {sorted(PREDICT_SETS)}"
                )
            self.predict_sets = {n: FlowPairs(PREDICT_SETS[n](data_dir), None, n) for n in names}

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise RuntimeError("call setup('fit') before asking for the train dataloader")
        workers = self.hparams.num_workers
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size_per_device,
            shuffle=True,
            drop_last=True,  # batch norm in the context encoder
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def _eval_loaders(self, sets: dict[str, Dataset] | None, what: str) -> list[DataLoader]:
        if sets is None:
            raise RuntimeError(f"call setup() before asking for the {what} dataloaders")
        # Every pair on exactly one rank (no padding sampler): metrics summed over ranks are exact.
        return [
            eval_loader(
                ds,
                self.hparams.val_batch_size,
                self.hparams.num_workers,
                self.trainer,
                pin_memory=torch.cuda.is_available(),
            )
            for ds in sets.values()
        ]

    def val_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.eval_sets, "validation")

    def test_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.eval_sets, "test")

    def predict_dataloader(self) -> list[DataLoader]:
        return self._eval_loaders(self.predict_sets, "predict")


class FlyingChairsDataModule(FlowDataModule):
    """Stage 1 (C): FlyingChairs' train split; validation on its 640-pair validation split.

    Thesis settings: crop 368x496, scale 2**[-0.1, 1.0], flips (deq-flow ``fetch_dataloader``);
    batch 12 (``train_H.sh``).
    """

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 12,
        num_workers: int = 4,
        crop_size: Sequence[int] = (368, 496),
        min_scale: float = -0.1,
        max_scale: float = 1.0,
        do_flip: bool = True,
        val_sets: Sequence[str] = ("chairs",),
        predict_sets: Sequence[str] = (),
        val_batch_size: int = 1,
        verify: bool | str = False,
    ) -> None:
        check_verify_mode(verify)
        check_set_names(val_sets, predict_sets)
        super().__init__()
        self.save_hyperparameters()

    def train_parts(self) -> dict[str, tuple[int, FlowAugmentor]]:
        hp = self.hparams
        return {"chairs": (1, self.augmentor(hp.min_scale, hp.max_scale, hp.do_flip, False))}


class FlyingThingsDataModule(FlowDataModule):
    """Stage 2 (T): FlyingThings3D TRAIN, left camera, both directions, clean and final passes.

    Thesis settings: crop 400x720, scale 2**[-0.4, 0.8], flips, batch 6; validation zero-shot on
    Sintel (training, clean and final) and KITTI-2015 (training), the C+T numbers the thesis
    reports (``train_H.sh``: ``--validation sintel kitti``).
    """

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 6,
        num_workers: int = 4,
        crop_size: Sequence[int] = (400, 720),
        min_scale: float = -0.4,
        max_scale: float = 0.8,
        do_flip: bool = True,
        passes: Sequence[str] = ("clean", "final"),
        val_sets: Sequence[str] = ("sintel_clean", "sintel_final", "kitti"),
        predict_sets: Sequence[str] = (),
        val_batch_size: int = 1,
        verify: bool | str = False,
    ) -> None:
        check_verify_mode(verify)
        check_set_names(val_sets, predict_sets, passes)
        super().__init__()
        self.save_hyperparameters()

    def train_parts(self) -> dict[str, tuple[int, FlowAugmentor]]:
        hp = self.hparams
        augment = self.augmentor(hp.min_scale, hp.max_scale, hp.do_flip, False)
        return {f"things_{p}": (1, augment) for p in hp.passes}


class SintelDataModule(FlowDataModule):
    """MPI-Sintel training set alone (clean and final passes); for the thesis's mix use
    :class:`FlowMixDataModule`. Augmentation as in the thesis's Sintel stage: crop 368x768,
    scale 2**[-0.2, 0.6], flips. Predicts the Sintel test set (both passes) for submission."""

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 6,
        num_workers: int = 4,
        crop_size: Sequence[int] = (368, 768),
        min_scale: float = -0.2,
        max_scale: float = 0.6,
        do_flip: bool = True,
        passes: Sequence[str] = ("clean", "final"),
        val_sets: Sequence[str] = ("sintel_clean", "sintel_final"),
        predict_sets: Sequence[str] = ("sintel_test_clean", "sintel_test_final"),
        val_batch_size: int = 1,
        verify: bool | str = False,
    ) -> None:
        check_verify_mode(verify)
        check_set_names(val_sets, predict_sets, passes)
        super().__init__()
        self.save_hyperparameters()

    def train_parts(self) -> dict[str, tuple[int, FlowAugmentor]]:
        hp = self.hparams
        augment = self.augmentor(hp.min_scale, hp.max_scale, hp.do_flip, False)
        return {f"sintel_{p}": (1, augment) for p in hp.passes}


class KittiDataModule(FlowDataModule):
    """KITTI-2015 fine-tuning (200 training pairs, sparse ground truth).

    Thesis settings: crop 288x960, scale 2**[-0.2, 0.4], no flips, batch 6, gamma 0.9
    (``train_H_full.sh``, ``fetch_dataloader``). Validates on the training pairs (the thesis's
    KITTI numbers) and predicts the testing pairs for submission.
    """

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 6,
        num_workers: int = 4,
        crop_size: Sequence[int] = (288, 960),
        min_scale: float = -0.2,
        max_scale: float = 0.4,
        do_flip: bool = False,
        val_sets: Sequence[str] = ("kitti",),
        predict_sets: Sequence[str] = ("kitti_test",),
        val_batch_size: int = 1,
        verify: bool | str = False,
    ) -> None:
        check_verify_mode(verify)
        check_set_names(val_sets, predict_sets)
        super().__init__()
        self.save_hyperparameters()

    def train_parts(self) -> dict[str, tuple[int, FlowAugmentor]]:
        hp = self.hparams
        return {"kitti": (1, self.augmentor(hp.min_scale, hp.max_scale, hp.do_flip, True))}


class HD1KDataModule(FlowDataModule):
    """HD1K (sparse ground truth), a part of the thesis's Sintel mix; alone mostly for checks.

    Augmentation as in the mix: scale 2**[-0.5, 0.2], flips, sparse-aware. HD1K has no
    validation split; by default its own training pairs are evaluated.
    """

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 6,
        num_workers: int = 4,
        crop_size: Sequence[int] = (368, 768),
        min_scale: float = -0.5,
        max_scale: float = 0.2,
        do_flip: bool = True,
        val_sets: Sequence[str] = ("hd1k",),
        predict_sets: Sequence[str] = (),
        val_batch_size: int = 1,
        verify: bool | str = False,
    ) -> None:
        check_verify_mode(verify)
        check_set_names(val_sets, predict_sets)
        super().__init__()
        self.save_hyperparameters()

    def train_parts(self) -> dict[str, tuple[int, FlowAugmentor]]:
        hp = self.hparams
        return {"hd1k": (1, self.augmentor(hp.min_scale, hp.max_scale, hp.do_flip, True))}


# The thesis's Sintel stage (C+T+S+K+H): 100x Sintel clean + 100x Sintel final + 200x KITTI
# + 5x HD1K + 1x FlyingThings3D clean pass (deq-flow core/datasets.py, fetch_dataloader).
MIX_WEIGHTS = {"sintel_clean": 100, "sintel_final": 100, "kitti": 200, "hd1k": 5, "things_clean": 1}
# Per-part log2 scale range and flips in that mix (the dense parts share Sintel's).
MIX_AUGMENT = {
    "sintel_clean": (-0.2, 0.6, True),
    "sintel_final": (-0.2, 0.6, True),
    "things_clean": (-0.2, 0.6, True),
    "things_final": (-0.2, 0.6, True),
    "chairs": (-0.2, 0.6, True),
    "kitti": (-0.3, 0.5, True),
    "hd1k": (-0.5, 0.2, True),
}


class FlowMixDataModule(FlowDataModule):
    """The thesis's Sintel fine-tuning stage: a weighted mix of Sintel, KITTI, HD1K and Things.

    ``weights`` repeat each part that many times per epoch (default ``MIX_WEIGHTS``; 0 drops a
    part); each part keeps its own augmentation (``MIX_AUGMENT``; KITTI and HD1K sparse-aware).
    Crop 368x768, batch 6, gamma 0.9 in the thesis.
    """

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 6,
        num_workers: int = 4,
        crop_size: Sequence[int] = (368, 768),
        weights: dict[str, int] | None = None,
        val_sets: Sequence[str] = ("sintel_clean", "sintel_final"),
        predict_sets: Sequence[str] = ("sintel_test_clean", "sintel_test_final"),
        val_batch_size: int = 1,
        verify: bool | str = False,
    ) -> None:
        check_verify_mode(verify)
        check_set_names(val_sets, predict_sets)
        weights = dict(MIX_WEIGHTS if weights is None else weights)
        unknown = sorted(set(weights) - set(MIX_AUGMENT))
        if unknown:
            raise ValueError(
                f"data.weights: unknown part(s) {unknown}; parts: {sorted(MIX_AUGMENT)}"
            )
        if any(int(w) != w or w < 0 for w in weights.values()) or not any(weights.values()):
            raise ValueError(
                f"data.weights must be non-negative integers, not all 0; got {weights}"
            )
        super().__init__()
        self.save_hyperparameters()
        self.weights = {k: int(w) for k, w in weights.items() if w}

    def train_parts(self) -> dict[str, tuple[int, FlowAugmentor]]:
        return {
            name: (repeats, self.augmentor(*MIX_AUGMENT[name], name in SPARSE_PARTS))
            for name, repeats in self.weights.items()
        }


# ----------------------------------------------------------------------------------------------
# The embedded default: synthetic pairs from scikit-image's photographs
# ----------------------------------------------------------------------------------------------

# Photographs and textures that ship inside scikit-image (no download). Validation and test use
# images never seen in training, so their EPE measures matching, not memorisation.
SYNTHETIC_IMAGES = {
    "train": (
        "astronaut",
        "rocket",
        "immunohistochemistry",
        "retina",
        "camera",
        "coins",
        "moon",
        "grass",
        "page",
        "text",
    ),
    "val": ("chelsea", "gravel"),
    "test": ("coffee", "brick"),
}


def load_skimage_photos(names: Sequence[str], min_side: int) -> list[list[Tensor]]:
    """Each photo as float ``(3, H, W)`` in [0, 255] at scales 1, 1/2, 1/4 (those >= min_side)."""
    import skimage.data

    photos = []
    for name in names:
        img = torch.from_numpy(np.asarray(getattr(skimage.data, name)(), dtype=np.float32))
        img = img[..., None].expand(*img.shape, 3) if img.dim() == 2 else img[..., :3]
        img = img.permute(2, 0, 1).contiguous()
        levels = []
        for factor in (1, 2, 4):
            size = (img.shape[1] // factor, img.shape[2] // factor)
            if min(size) >= min_side:
                small = F.interpolate(img[None], size=size, mode="bilinear", antialias=True)[0]
                levels.append(small)
        photos.append(levels)
    return photos


def _sample_bilinear(img: Tensor, coords: Tensor) -> Tensor:
    """Sample ``(C, H, W)`` at pixel coordinates ``(2, h, w)`` (x, y); zeros outside."""
    h, w = img.shape[-2:]
    gx = 2 * coords[0] / (w - 1) - 1
    gy = 2 * coords[1] / (h - 1) - 1
    grid = torch.stack([gx, gy], dim=-1)[None]
    return F.grid_sample(img[None], grid, mode="bilinear", align_corners=True)[0]


def _rotation(angle: Tensor, scale: Tensor) -> Tensor:
    c, s = torch.cos(angle), torch.sin(angle)
    return scale * torch.stack([torch.stack([c, -s]), torch.stack([s, c])])


class SyntheticFlowPairs(Dataset):
    """Frame pairs with exact ground truth, made by moving real photographs.

    Frame 2 is a crop of a photo; frame 1 samples the same photo at ``x + u(x)``, so the flow
    from frame 1 to frame 2 is exactly ``u`` (bilinear sampling blurs frame 1 a little, it does
    not move it). ``u`` is a random affine motion (rotation, zoom, shear, translation) plus a
    smooth local deformation. Up to ``max_objects`` elliptical patches cut from other photos move
    with their own similarity motions in front of the background: they occlude it and are
    disoccluded, and the ground truth of frame 1 is the object's motion where it is in front.
    Independent pixel noise is added to each frame.

    ``seed=None`` draws each pair from torch's global generator (training: new pairs each epoch);
    an integer makes pair ``i`` a function of ``(seed, i)`` (evaluation sets).
    """

    def __init__(
        self,
        photos: list[list[Tensor]],
        length: int,
        crop_size: int = 64,
        max_translation: float = 6.0,
        max_objects: int = 2,
        seed: int | None = None,
    ) -> None:
        self.photos, self.length, self.size = photos, length, crop_size
        self.max_translation, self.max_objects, self.seed = max_translation, max_objects, seed
        # Largest background displacement: translation + rotation/zoom/shear at the corners
        # + local deformation; frame 1 samples the photo this far around the crop.
        self.margin = math.ceil(max_translation + 0.2 * crop_size + 3)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if self.seed is None:
            g = torch.Generator().manual_seed(int(torch.randint(2**62, ())))
        else:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return self.make_pair(g)

    def _u(self, g: torch.Generator, *shape: int) -> Tensor:
        return torch.rand(shape, generator=g) * 2 - 1  # uniform in [-1, 1)

    def _crop(self, g: torch.Generator, side: int) -> Tensor:
        levels = self.photos[int(torch.randint(len(self.photos), (), generator=g))]
        usable = [p for p in levels if min(p.shape[-2:]) >= side]
        photo = usable[int(torch.randint(len(usable), (), generator=g))]
        y0 = int(torch.randint(photo.shape[1] - side + 1, (), generator=g))
        x0 = int(torch.randint(photo.shape[2] - side + 1, (), generator=g))
        return photo[:, y0 : y0 + side, x0 : x0 + side]

    def make_pair(self, g: torch.Generator) -> dict:
        s, m = self.size, self.margin
        source = self._crop(g, s + 2 * m)
        grid = torch.stack(
            torch.meshgrid(
                torch.arange(s, dtype=torch.float32),
                torch.arange(s, dtype=torch.float32),
                indexing="xy",
            )
        )  # (2, s, s): x, y
        centre = (s - 1) / 2

        # Background: affine (rotation +-8 deg, zoom +-8%, shear +-5%) + translation
        # + a smooth deformation of up to 2 px (a 4x4 random field, bicubic).
        angle, zoom, shear = self._u(g, 3) * torch.tensor([math.radians(8), 0.08, 0.05])
        a = _rotation(angle, 1 + zoom) + torch.tensor([[0.0, shear], [0.0, 0.0]])
        rel = (grid - centre).reshape(2, -1)
        flow = ((a - torch.eye(2)) @ rel).reshape(2, s, s)
        flow = flow + (self._u(g, 2) * self.max_translation)[:, None, None]
        field = self._u(g, 1, 2, 4, 4) * 2.0 * float(torch.rand((), generator=g))
        flow = flow + F.interpolate(field, size=(s, s), mode="bicubic", align_corners=True)[0]
        flow = flow.clamp(-m + 1, m - 1)
        img2 = source[:, m : m + s, m : m + s].clone()
        img1 = _sample_bilinear(source, grid + m + flow)

        # Foreground objects: textured ellipses moving in front.
        n_objects = int(torch.randint(self.max_objects + 1, (), generator=g))
        for _ in range(n_objects):
            texture = self._crop(g, s)
            radii = (0.15 + 0.2 * torch.rand(2, generator=g)) * s
            tilt = float(torch.rand((), generator=g)) * math.pi
            rot = _rotation(torch.tensor(tilt), torch.tensor(1.0))
            tex_rel = rot.T @ (grid - centre).reshape(2, -1)
            inside = ((tex_rel / radii[:, None]) ** 2).sum(0) <= 1
            mask = inside.float().reshape(1, s, s)
            p1 = centre + self._u(g, 2) * 0.3 * s
            p2 = p1 + self._u(g, 2) * 1.5 * self.max_translation
            angle2, zoom2 = self._u(g, 2) * torch.tensor([math.radians(10), 0.1])
            m2 = _rotation(angle2, 1 + zoom2)
            # Texture coordinates of each frame's pixels: frame 1 places the texture centred at
            # p1; frame 2 at p2, rotated and zoomed by m2.
            q1 = (grid.reshape(2, -1) - p1[:, None]) + centre
            q2 = torch.linalg.solve(m2, grid.reshape(2, -1) - p2[:, None]) + centre
            alpha1 = _sample_bilinear(mask, q1.reshape(2, s, s))
            alpha2 = _sample_bilinear(mask, q2.reshape(2, s, s))
            img1 = alpha1 * _sample_bilinear(texture, q1.reshape(2, s, s)) + (1 - alpha1) * img1
            img2 = alpha2 * _sample_bilinear(texture, q2.reshape(2, s, s)) + (1 - alpha2) * img2
            target = p2[:, None] + m2 @ (q1 - centre)  # where frame-1 pixels land in frame 2
            object_flow = (target - grid.reshape(2, -1)).reshape(2, s, s)
            flow = torch.where(alpha1 >= 0.5, object_flow, flow)

        sigma = 3.0 * torch.rand(2, generator=g)
        img1 = img1 + sigma[0] * torch.randn(img1.shape, generator=g)
        img2 = img2 + sigma[1] * torch.randn(img2.shape, generator=g)
        return {
            "image1": img1.clamp(0, 255),
            "image2": img2.clamp(0, 255),
            "flow": flow,
            "valid": torch.ones(s, s),
        }


class SyntheticFlowDataModule(pl.LightningDataModule):
    """The embedded default: synthetic pairs from scikit-image photos, trainable on a CPU.

    Training pairs are new every epoch (``train_size`` per epoch); validation and test pairs are
    fixed by ``seed`` and use held-out photos (``SYNTHETIC_IMAGES``). ``epe_zero`` holds the EPE
    of predicting zero flow on the validation and test sets (``{"val": ..., "test": ...}``),
    the baseline a trained model must beat; it is available after ``setup()``.
    """

    def __init__(
        self,
        batch_size: int = 8,
        num_workers: int = 0,
        seed: int = 0,
        crop_size: int = 64,
        train_size: int = 4000,
        val_size: int = 128,
        test_size: int = 256,
        max_translation: float = 6.0,
        max_objects: int = 2,
    ) -> None:
        if crop_size < 64 or crop_size % 8:
            raise ValueError(f"data.crop_size must be a multiple of 8 and >= 64, got {crop_size}")
        if min(train_size, val_size, test_size) < 1:
            raise ValueError("data.train_size, data.val_size and data.test_size must be >= 1")
        super().__init__()
        self.save_hyperparameters()
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None
        self.epe_zero: dict[str, float] = {}
        self.batch_size_per_device: int | None = None
        self.val_names = ["synthetic"]  # one validation set, named like the real modules' sets

    def _pairs(self, split: str, length: int, seed: int | None) -> SyntheticFlowPairs:
        hp = self.hparams
        side = hp.crop_size + 2 * math.ceil(hp.max_translation + 0.2 * hp.crop_size + 3)
        photos = load_skimage_photos(SYNTHETIC_IMAGES[split], side)
        return SyntheticFlowPairs(
            photos, length, hp.crop_size, hp.max_translation, hp.max_objects, seed
        )

    def setup(self, stage: str | None = None) -> None:
        self.batch_size_per_device = per_device_batch_size(self.hparams.batch_size, self.trainer)
        if stage == "fit":
            check_train_size(
                self.hparams.train_size,
                self.hparams.batch_size,
                "synthetic flow",
                "pairs (data.train_size)",
                "raise data.train_size",
            )
        if self.train_set is None:
            hp = self.hparams
            self.train_set = self._pairs("train", hp.train_size, None)
            self.val_set = self._pairs("val", hp.val_size, 2 * hp.seed + 1)
            self.test_set = self._pairs("test", hp.test_size, 2 * hp.seed + 2)
            self.epe_zero = {
                "val": self.zero_flow_epe(self.val_set),
                "test": self.zero_flow_epe(self.test_set),
            }

    @staticmethod
    def zero_flow_epe(dataset: Dataset) -> float:
        """EPE of a zero prediction: the mean flow length over all pixels of the set."""
        total, count = 0.0, 0
        for i in range(len(dataset)):
            flow = dataset[i]["flow"]
            total += float(torch.linalg.vector_norm(flow, dim=0).double().sum())
            count += flow[0].numel()
        return total / count

    def _loader(self, dataset: Dataset | None, train: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("call setup() before asking for a dataloader")
        workers = self.hparams.num_workers
        if not train:  # each pair on exactly one rank: exact metrics under DDP
            return eval_loader(dataset, self.batch_size_per_device, workers, self.trainer)
        return DataLoader(
            dataset,
            batch_size=self.batch_size_per_device,
            shuffle=train,
            drop_last=train,
            num_workers=workers,
            persistent_workers=workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, train=False)
