"""Optical-flow datasets on disk: one index class per real layout, and the frame-pair dataset.

The real datasets live under one ``data_dir`` with the folder names of the thesis repo
(locuslab/deq-flow ``core/datasets.py``, which reads ``datasets/``); torchvision's names
(``FlyingChairs``, ``KittiFlow``, ``hd1k``) are accepted too. We index the folders ourselves
rather than through ``torchvision.datasets``: the thesis's layout differs in names, and the
Sintel/KITTI submissions need each frame's scene and id, which torchvision does not expose.
Each index class carries its layout, which every layout error prints.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from glob import glob
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from torch.utils.data import Dataset

from deq_lightning.datamodules.checks import quick_image_check, read_named
from deq_lightning.datamodules.common import DatasetLayoutError
from deq_lightning.datamodules.flow_augment import FlowAugmentor
from deq_lightning.datamodules.flow_io import (
    FlowFormatError,
    check_flow_header,
    read_flow,
    read_image,
)


@dataclass(frozen=True)
class FlowSample:
    """One frame pair on disk."""

    image1: Path
    image2: Path
    flow: Path | None  # None for unlabelled benchmark frames
    name: str  # unlabelled: the submission file's relative path
    new_sequence: bool = True


def _sorted(pattern: Path) -> list[Path]:
    return [Path(p) for p in sorted(glob(str(pattern)))]


class FlowIndex:
    """One on-disk format: the folder names it goes by under ``data_dir``, its layout, and its
    frame pairs per split (and pass, where the format has several)."""

    dataset: ClassVar[str]
    folders: ClassVar[tuple[str, ...]]  # first: the thesis repo's name; later: torchvision's
    layout: ClassVar[str]
    sparse: ClassVar[bool] = False  # sparse ground truth: augmented by moving valid pixels

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    @classmethod
    def find(cls, data_dir: str | Path) -> FlowIndex:
        """The index of this format's folder under ``data_dir`` (thesis name first)."""
        base = Path(data_dir).expanduser()
        for name in cls.folders:
            if (base / name).is_dir():
                return cls(base / name)
        problem = f"no {' or '.join(cls.folders)} folder"
        raise DatasetLayoutError(cls.dataset, base, problem, cls.layout, "data.data_dir")

    def error(self, problem: str) -> DatasetLayoutError:
        return DatasetLayoutError(self.dataset, self.root, problem, self.layout, "data.data_dir")

    def pairs(self, split: str, pass_name: str = "") -> list[FlowSample]:
        raise NotImplementedError


class ChairsIndex(FlowIndex):
    """FlyingChairs: pairs of ``split`` ('train' or 'val') by the split file."""

    dataset = "chairs"
    folders = ("FlyingChairs_release", "FlyingChairs")
    layout = """\
<data_dir>/FlyingChairs_release/         (or FlyingChairs/)
    data/00001_img1.ppm, data/00001_img2.ppm, data/00001_flow.flo, ...
    chairs_split.txt                     one line per pair: 1 = train, 2 = validation; also
                                         accepted as FlyingChairs_train_val.txt (dataset page)"""

    def pairs(self, split: str, pass_name: str = "") -> list[FlowSample]:
        root = self.root
        images, flows = _sorted(root / "data" / "*.ppm"), _sorted(root / "data" / "*.flo")
        if not flows:
            raise self.error("no data/*.flo files")
        if len(images) != 2 * len(flows):
            raise self.error(f"{len(images)} .ppm images for {len(flows)} .flo flows (want 2 each)")
        names = ("chairs_split.txt", "FlyingChairs_train_val.txt")
        split_file = next((root / n for n in names if (root / n).is_file()), None)
        if split_file is None:
            raise self.error("no chairs_split.txt (the train/validation split)")
        ids = np.loadtxt(split_file, dtype=np.int64, ndmin=1)
        if len(ids) != len(flows) or not np.isin(ids, (1, 2)).all():
            raise self.error(
                f"{split_file.name} must hold one 1 or 2 per pair ({len(flows)} pairs, "
                f"{len(ids)} lines)"
            )
        want = {"train": 1, "val": 2}[split]
        return [
            FlowSample(images[2 * i], images[2 * i + 1], flows[i], flows[i].stem)
            for i in range(len(flows))
            if ids[i] == want
        ]


class ThingsIndex(FlowIndex):
    """FlyingThings3D left-camera pairs of ``split`` ('TRAIN'/'TEST'), both time directions."""

    dataset = "things"
    folders = ("FlyingThings3D",)
    layout = """\
<data_dir>/FlyingThings3D/
    frames_cleanpass/{TRAIN,TEST}/<A|B|C>/<seq>/left/0006.png ...
    frames_finalpass/{TRAIN,TEST}/<A|B|C>/<seq>/left/0006.png ...
    optical_flow/{TRAIN,TEST}/<A|B|C>/<seq>/{into_future,into_past}/left/OpticalFlowInto*.pfm"""

    def pairs(self, split: str, pass_name: str = "") -> list[FlowSample]:
        frames = f"frames_{pass_name}pass"
        seq_dirs = _sorted(self.root / frames / split / "*" / "*")
        if not seq_dirs:
            raise self.error(f"no {frames}/{split}/<A|B|C>/<seq> folders")
        samples = []
        for seq in seq_dirs:
            rel = seq.relative_to(self.root / frames)
            images = _sorted(seq / "left" / "*.png")
            for direction in ("into_future", "into_past"):
                flows = _sorted(self.root / "optical_flow" / rel / direction / "left" / "*.pfm")
                if len(flows) != len(images):
                    raise self.error(
                        f"{len(images)} images in {frames}/{rel}/left but {len(flows)} flows in "
                        f"optical_flow/{rel}/{direction}/left"
                    )
                for i in range(len(flows) - 1):
                    if direction == "into_future":
                        pair = (images[i], images[i + 1], flows[i])
                    else:
                        pair = (images[i + 1], images[i], flows[i + 1])
                    samples.append(FlowSample(*pair, f"{rel}/{direction}/{pair[0].stem}"))
        return samples


class SintelIndex(FlowIndex):
    """Sintel pairs of consecutive frames within each scene; ``split`` 'training' or 'test'."""

    dataset = "sintel"
    folders = ("Sintel",)
    layout = """\
<data_dir>/Sintel/
    training/{clean,final}/<scene>/frame_0001.png ...
    training/flow/<scene>/frame_0001.flo ...    (flow from frame i to frame i+1)
    test/{clean,final}/<scene>/frame_0001.png ..."""

    def pairs(self, split: str, pass_name: str = "") -> list[FlowSample]:
        image_root = self.root / split / pass_name
        scenes = sorted(p for p in image_root.glob("*") if p.is_dir())
        if not scenes:
            raise self.error(f"no scene folders in {split}/{pass_name}")
        samples = []
        for scene in scenes:
            images = _sorted(scene / "*.png")
            flows: list[Path | None] = [None] * (len(images) - 1)
            if split == "training":
                flows = _sorted(self.root / split / "flow" / scene.name / "*.flo")
                if len(flows) != len(images) - 1:
                    raise self.error(
                        f"{len(images)} frames in {split}/{pass_name}/{scene.name} need "
                        f"{len(images) - 1} flows in {split}/flow/{scene.name}, found {len(flows)}"
                    )
            for i in range(len(images) - 1):
                name = f"{pass_name}/{scene.name}/frame{i + 1:04d}.flo"  # the submission's naming
                samples.append(FlowSample(images[i], images[i + 1], flows[i], name, i == 0))
        return samples


class KittiIndex(FlowIndex):
    """KITTI-2015 pairs (``*_10.png``, ``*_11.png``); ``split`` 'training' or 'testing'."""

    sparse = True
    dataset = "kitti"
    folders = ("KITTI", "KittiFlow")
    layout = """\
<data_dir>/KITTI/                        (or KittiFlow/)
    training/image_2/000000_10.png, 000000_11.png, ...
    training/flow_occ/000000_10.png, ...      16-bit PNG flow with a valid channel
    testing/image_2/000000_10.png, 000000_11.png, ..."""

    def pairs(self, split: str, pass_name: str = "") -> list[FlowSample]:
        first = _sorted(self.root / split / "image_2" / "*_10.png")
        second = _sorted(self.root / split / "image_2" / "*_11.png")
        if not first or len(first) != len(second):
            raise self.error(f"{len(first)} *_10.png and {len(second)} *_11.png in {split}/image_2")
        flows: list[Path | None] = [None] * len(first)
        if split == "training":
            flows = _sorted(self.root / split / "flow_occ" / "*_10.png")
            if len(flows) != len(first):
                raise self.error(
                    f"{len(first)} image pairs but {len(flows)} training/flow_occ files"
                )
        return [FlowSample(a, b, f, a.name) for a, b, f in zip(first, second, flows)]


class HD1KIndex(FlowIndex):
    """HD1K pairs of consecutive frames within each sequence (one split: all of it)."""

    dataset = "hd1k"
    folders = ("HD1k", "hd1k")
    layout = """\
<data_dir>/HD1k/                         (or hd1k/)
    hd1k_input/image_2/000000_0000.png, 000000_0001.png, ...   <sequence>_<frame>
    hd1k_flow_gt/flow_occ/000000_0000.png, ...                 KITTI-format 16-bit PNG"""
    sparse = True

    def pairs(self, split: str = "", pass_name: str = "") -> list[FlowSample]:
        flow_dir, image_dir = self.root / "hd1k_flow_gt" / "flow_occ", self.root / "hd1k_input"
        flows_all = _sorted(flow_dir / "*.png")
        if not flows_all:
            raise self.error("no hd1k_flow_gt/flow_occ/*.png files")
        samples = []
        for seq in sorted({p.name.split("_")[0] for p in flows_all}):
            flows = _sorted(flow_dir / f"{seq}_*.png")
            images = _sorted(image_dir / "image_2" / f"{seq}_*.png")
            if len(images) < len(flows):
                raise self.error(f"sequence {seq}: {len(flows)} flows but {len(images)} images")
            for i in range(len(flows) - 1):
                samples.append(
                    FlowSample(images[i], images[i + 1], flows[i], flows[i].stem, i == 0)
                )
        return samples


@dataclass(frozen=True)
class FlowSet:
    """A named set: a format's split (and pass), found under ``data_dir`` when loaded."""

    index: type[FlowIndex]
    split: str = ""
    pass_name: str = ""

    def samples(self, data_dir: str | Path) -> list[FlowSample]:
        return self.index.find(data_dir).pairs(self.split, self.pass_name)


# Training parts, evaluation sets (labelled) and benchmark test sets (unlabelled), by name.
TRAIN_PARTS = {
    "chairs": FlowSet(ChairsIndex, "train"),
    "things_clean": FlowSet(ThingsIndex, "TRAIN", "clean"),
    "things_final": FlowSet(ThingsIndex, "TRAIN", "final"),
    "sintel_clean": FlowSet(SintelIndex, "training", "clean"),
    "sintel_final": FlowSet(SintelIndex, "training", "final"),
    "kitti": FlowSet(KittiIndex, "training"),
    "hd1k": FlowSet(HD1KIndex),
}
EVAL_SETS = {
    **TRAIN_PARTS,  # Sintel, KITTI and HD1K: evaluated on their training sets, as in the thesis
    "chairs": FlowSet(ChairsIndex, "val"),
    "things_clean": FlowSet(ThingsIndex, "TEST", "clean"),
    "things_final": FlowSet(ThingsIndex, "TEST", "final"),
}
PREDICT_SETS = {
    "sintel_test_clean": FlowSet(SintelIndex, "test", "clean"),
    "sintel_test_final": FlowSet(SintelIndex, "test", "final"),
    "kitti_test": FlowSet(KittiIndex, "testing"),
}


class FlowPairs(Dataset):
    """Frame pairs read from disk, optionally augmented (see ``datamodules.flow`` for the keys)."""

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
