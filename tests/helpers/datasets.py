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


def write_cityscapes(root: Path, width: int = 64, height: int = 32, seed: int = 0) -> Path:
    """``root/leftImg8bit/{train,val,test}/<city>/*_leftImg8bit.png`` and the matching
    ``gtFine/.../*_gtFine_labelIds.png`` (random pixels; ids from evaluated and void classes):
    2 train cities x 2 frames, 1 val city x 2, 1 test city x 1."""
    rng = np.random.default_rng(seed)
    ids = np.array([0, 7, 8, 11, 21, 23, 24, 26, 33], dtype=np.uint8)
    for split, cities, frames in (("train", 2, 2), ("val", 1, 2), ("test", 1, 1)):
        for c in range(cities):
            city = f"{split}city{c}"
            for f in range(frames):
                stem = f"{city}_{c:06d}_{f:06d}"
                img_dir = root / "leftImg8bit" / split / city
                lbl_dir = root / "gtFine" / split / city
                img_dir.mkdir(parents=True, exist_ok=True)
                lbl_dir.mkdir(parents=True, exist_ok=True)
                rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
                Image.fromarray(rgb).save(img_dir / f"{stem}_leftImg8bit.png")
                lbl = rng.choice(ids, size=(height, width)).astype(np.uint8)
                Image.fromarray(lbl).save(lbl_dir / f"{stem}_gtFine_labelIds.png")
    return root


def write_text_corpus(root: Path, names: dict[str, str], seed: int = 0) -> Path:
    """Three tiny word-level splits; valid/test use only training words."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(40)]
    root.mkdir(parents=True, exist_ok=True)
    for split, name in names.items():
        lines = [
            " ".join(rng.choice(words, size=12)) for _ in range(60 if split == "train" else 20)
        ]
        if split == "train":
            lines.append(" ".join(words))  # every word occurs in training
        (root / name).write_text("\n".join(lines) + "\n")
    return root


def write_flow_datasets(root: Path, size: tuple[int, int] = (64, 72), seed: int = 0) -> Path:
    """FlyingChairs, FlyingThings3D, Sintel, KITTI-2015 and HD1K under ``root`` in the thesis's
    layout (deq_lightning/datamodules/flow_index.py): random frames, small random flows, KITTI
    and HD1K sparse (and 64 x 72, so KITTI's bottom padding is exercised)."""
    from deq_lightning.datamodules.flow_io import write_flo, write_kitti_png, write_pfm

    rng = np.random.default_rng(seed)
    h, w = size

    def frame(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)

    def flow() -> np.ndarray:
        return rng.uniform(-3, 3, (h, w, 2)).astype(np.float32)

    def sparse(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_kitti_png(path, flow(), rng.random((h, w)) < 0.5)

    chairs = root / "FlyingChairs_release"
    for i in (1, 2, 3):
        frame(chairs / "data" / f"{i:05d}_img1.ppm")
        frame(chairs / "data" / f"{i:05d}_img2.ppm")
        write_flo(chairs / "data" / f"{i:05d}_flow.flo", flow())
    (chairs / "chairs_split.txt").write_text("1\n1\n2\n")
    things = root / "FlyingThings3D"
    for split in ("TRAIN", "TEST"):
        for pass_name in ("clean", "final"):
            for f in (6, 7):
                frame(things / f"frames_{pass_name}pass/{split}/A/0000/left/{f:04d}.png")
        for direction in ("IntoFuture", "IntoPast"):
            folder = "into_future" if direction == "IntoFuture" else "into_past"
            for f in (6, 7):
                path = things / f"optical_flow/{split}/A/0000/{folder}/left"
                path.mkdir(parents=True, exist_ok=True)
                pfm = np.dstack([flow(), np.zeros((h, w), np.float32)])
                write_pfm(path / f"OpticalFlow{direction}_{f:04d}_L.pfm", pfm)
    sintel = root / "Sintel"
    for split in ("training", "test"):
        for pass_name in ("clean", "final"):
            for f in (1, 2):
                frame(sintel / split / pass_name / "alley_1" / f"frame_{f:04d}.png")
    (sintel / "training" / "flow" / "alley_1").mkdir(parents=True)
    write_flo(sintel / "training" / "flow" / "alley_1" / "frame_0001.flo", flow())
    kitti = root / "KITTI"
    for split in ("training", "testing"):
        for i in (0, 1):
            for suffix in ("10", "11"):
                frame(kitti / split / "image_2" / f"{i:06d}_{suffix}.png")
    for i in (0, 1):
        sparse(kitti / "training" / "flow_occ" / f"{i:06d}_10.png")
    hd1k = root / "HD1k"
    for f in (0, 1):
        frame(hd1k / "hd1k_input" / "image_2" / f"000000_{f:04d}.png")
        sparse(hd1k / "hd1k_flow_gt" / "flow_occ" / f"000000_{f:04d}.png")
    return root


TINY_LM = [
    "model.d_model=32",
    "model.n_head=2",
    "model.d_head=16",
    "model.d_inner=64",
    "model.cutoffs=[10,20]",
    "model.div_val=2",
    "model.mem_len=8",
    "data.batch_size=4",
    "data.eval_batch_size=2",
    "data.tgt_len=8",
    "data.eval_tgt_len=8",
    "trainer.devices=1",
    "trainer.accelerator=cpu",
]


# DEQ-TrellisNet's keys (model=deq_trellisnet*), at TINY_LM's data sizes.
TINY_TRELLIS = [
    "model.d_embed=16",
    "model.nhid=8",
    "model.nout=16",
    "model.cutoffs=[10,20]",
    *TINY_LM[7:],
]


QUICK = [
    "solver.max_iter=3",
    "solver.eval_opts={max_iter: 3}",
    "backward.max_iter=3",
    "backward.extra_ok=true",  # max_iter bounds the implicit backward; phantom/one-step ignore it
    "task.pretrain_steps=0",
]


def tiny_lm(experiment: str) -> list[str]:
    return TINY_TRELLIS if "trellis" in experiment else TINY_LM


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
    if experiment.startswith(("wt103", "wt2")):
        splits = {s: f"wiki.{s}.tokens" for s in ("train", "valid", "test")}
        write_text_corpus(tmp / "data" / "wiki", splits)
        return [*QUICK, *tiny_lm(experiment), f"data.data_dir={tmp / 'data' / 'wiki'}"]
    if experiment.startswith("ptb") or experiment == "lm_small":  # lm_small reads PTB files
        write_text_corpus(
            tmp / "data" / "ptb", {s: f"ptb.{s}.txt" for s in ("train", "valid", "test")}
        )
        return [*QUICK, *tiny_lm(experiment), f"data.data_dir={tmp / 'data' / 'ptb'}"]
    if experiment.startswith("cityscapes"):
        root = write_cityscapes(tmp / "data" / "cityscapes")
        return [
            *QUICK,
            f"data.data_dir={root}",
            "data.batch_size=2",
            "data.eval_batch_size=1",
            "data.num_workers=0",
            "data.crop_size=[32,64]",
            "data.base_size=64",
        ]
    if experiment.startswith("deq_flow_"):
        # The thesis's B/H widths on 64-px frames (3 correlation levels instead of 4, which
        # need 128 px); stages run without the previous stage's weights (their loading is
        # tested in tests/tasks/test_flow.py).
        root = write_flow_datasets(tmp / "data" / "flow")
        return [
            *QUICK,
            f"data.data_dir={root}",
            "data.batch_size=2",
            "data.num_workers=0",
            "data.crop_size=[64,64]",
            "model.corr_levels=3",
            "task.require_init=false",
        ]
    if experiment.startswith("flow_"):
        return [
            *QUICK,
            "data.train_size=8",
            "data.val_size=2",
            "data.test_size=2",
            "data.batch_size=2",
        ]
    if experiment.startswith("seg_"):
        return [*QUICK, "data.n_train=32", "data.n_val=8", "data.n_test=8"]
    if experiment.startswith("copy_memory"):
        return [
            *QUICK,
            "data.blank_len=4",
            "data.batch_size=4",
            "data.n_val=8",
            "data.n_test=8",
            "trainer.devices=1",
            "trainer.accelerator=cpu",
        ]
    if experiment.startswith("lm_"):
        return [
            *QUICK,
            "data.train_tokens=20000",
            "data.valid_tokens=2000",
            "data.test_tokens=2000",
        ]
    return QUICK
