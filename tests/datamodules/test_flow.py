"""Optical-flow data: each loader on tiny files in its real layout, augmentation geometry, the mix,
layout errors, and the synthetic default."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image

from deq_lightning.datamodules.common import DatasetLayoutError
from deq_lightning.datamodules.flow import FlowDataModule
from deq_lightning.datamodules.flow_augment import FlowAugmentor, resize_sparse_flow
from deq_lightning.datamodules.flow_index import (
    ChairsIndex,
    FlowPairs,
    HD1KIndex,
    KittiIndex,
    SintelIndex,
    ThingsIndex,
)
from deq_lightning.datamodules.flow_io import write_flo, write_kitti_png, write_pfm
from deq_lightning.datamodules.flow_synthetic import (
    SyntheticFlowDataModule,
    SyntheticFlowPairs,
    load_skimage_photos,
)
from deq_lightning.metrics import finalize_flow_metrics, flow_metric_sums

from ..helpers.app import CONF, compose_cfg

H, W = 40, 48  # frame size of the fake datasets
CROP = (32, 40)


# ----------------------------------------------------------------------------------------------
# Fake datasets in their real layouts. Frame k is filled with grey level k, pair k's flow is the
# constant (k, -k), so that tests can tell which files were paired.
# ----------------------------------------------------------------------------------------------


def write_frame(path: Path, level: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((H, W, 3), level, np.uint8)).save(path)


def const_flow(k: float) -> np.ndarray:
    return np.dstack([np.full((H, W), k, np.float32), np.full((H, W), -k, np.float32)])


def make_chairs(
    root: Path, split_name: str = "chairs_split.txt", folder: str = "FlyingChairs_release"
) -> None:
    data = root / folder / "data"
    for i in (1, 2, 3):
        write_frame(data / f"{i:05d}_img1.ppm", 10 * i)
        write_frame(data / f"{i:05d}_img2.ppm", 10 * i + 1)
        write_flo(data / f"{i:05d}_flow.flo", const_flow(i))
    (root / folder / split_name).write_text("1\n2\n1\n")


def make_things(root: Path) -> None:
    base = root / "FlyingThings3D"
    for split in ("TRAIN", "TEST"):
        for pass_name, offset in (("clean", 0), ("final", 100)):
            for f in range(3):
                write_frame(
                    base / f"frames_{pass_name}pass/{split}/A/0000/left/{6 + f:04d}.png", offset + f
                )
        for direction, sign in (("into_future", 1), ("into_past", -1)):
            for f in range(3):
                pfm = np.dstack([const_flow(sign * (f + 1)), np.zeros((H, W), np.float32)])
                name = f"OpticalFlow{direction.title().replace('_', '')}_{6 + f:04d}_L.pfm"
                path = base / f"optical_flow/{split}/A/0000/{direction}/left/{name}"
                path.parent.mkdir(parents=True, exist_ok=True)
                write_pfm(path, pfm)


def make_sintel(root: Path) -> None:
    base = root / "Sintel"
    for split, scenes in (("training", {"alley_1": 3, "bamboo_1": 2}), ("test", {"ambush_1": 3})):
        for pass_name in ("clean", "final"):
            for s, (scene, n) in enumerate(scenes.items()):
                for f in range(n):
                    write_frame(
                        base / split / pass_name / scene / f"frame_{f + 1:04d}.png", 20 * s + f
                    )
        if split == "training":
            for scene, n in scenes.items():
                (base / split / "flow" / scene).mkdir(parents=True)
                for f in range(n - 1):
                    write_flo(
                        base / split / "flow" / scene / f"frame_{f + 1:04d}.flo", const_flow(f + 1)
                    )


def kitti_valid() -> np.ndarray:
    valid = np.zeros((H, W), bool)
    valid[::3, ::2] = True
    return valid


def make_kitti(root: Path, folder: str = "KITTI") -> None:
    base = root / folder
    for split in ("training", "testing"):
        for i in range(2):
            write_frame(base / split / "image_2" / f"{i:06d}_10.png", 30 + i)
            write_frame(base / split / "image_2" / f"{i:06d}_11.png", 40 + i)
    (base / "training" / "flow_occ").mkdir()
    for i in range(2):
        write_kitti_png(
            base / "training" / "flow_occ" / f"{i:06d}_10.png", const_flow(i + 0.5), kitti_valid()
        )


def make_hd1k(root: Path, folder: str = "HD1k") -> None:
    """torchvision's HD1K layout: hd1k_input/image_2 and hd1k_flow_gt/flow_occ, both named
    <sequence:06d>_<frame:04d>.png, flows in KITTI's 16-bit PNG format."""
    base = root / folder
    (base / "hd1k_flow_gt" / "flow_occ").mkdir(parents=True)
    for seq, n in ((0, 3), (1, 2)):
        for f in range(n):
            write_frame(base / "hd1k_input" / "image_2" / f"{seq:06d}_{f:04d}.png", 50 * seq + f)
            write_kitti_png(
                base / "hd1k_flow_gt" / "flow_occ" / f"{seq:06d}_{f:04d}.png",
                const_flow(f),
                kitti_valid(),
            )


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    make_chairs(tmp_path)
    make_things(tmp_path)
    make_sintel(tmp_path)
    make_kitti(tmp_path)
    make_hd1k(tmp_path)
    return tmp_path


def preset(name: str, data_dir: Path, **overrides: object) -> FlowDataModule:
    """``data=<name>`` as the app builds it, on ``data_dir``, with keys replaced by ``overrides``."""
    cfg = OmegaConf.load(CONF / "data" / f"{name}.yaml")
    cfg.data_dir = str(data_dir)
    for key, value in overrides.items():
        cfg[key] = value
    kwargs = OmegaConf.to_container(cfg)
    assert kwargs.pop("_target_") == "deq_lightning.datamodules.flow.FlowDataModule"
    return FlowDataModule(**kwargs)


def levels(sample: dict) -> tuple[int, int]:
    return int(sample["image1"][0, 0, 0]), int(sample["image2"][0, 0, 0])


# ----------------------------------------------------------------------------------------------
# Indexing and reading
# ----------------------------------------------------------------------------------------------


def test_chairs_split_file_picks_pairs(data_dir: Path) -> None:
    root = data_dir / "FlyingChairs_release"
    train, val = ChairsIndex(root).pairs("train"), ChairsIndex(root).pairs("val")
    assert [s.flow.name for s in train] == ["00001_flow.flo", "00003_flow.flo"]
    sample = FlowPairs(val)[0]
    assert levels(sample) == (20, 21)
    assert torch.equal(sample["flow"], torch.from_numpy(const_flow(2)).permute(2, 0, 1))
    assert sample["valid"].all()


def test_chairs_torchvision_layout(tmp_path: Path) -> None:
    make_chairs(tmp_path, "FlyingChairs_train_val.txt", "FlyingChairs")
    dm = preset("chairs", tmp_path, batch_size=2, num_workers=0, crop_size=CROP)
    dm.setup("fit")
    assert len(dm.train_set) == 2 and len(dm.eval_sets["chairs"]) == 1


def test_things_both_directions_and_passes(data_dir: Path) -> None:
    samples = ThingsIndex(data_dir / "FlyingThings3D").pairs("TRAIN", "final")
    assert len(samples) == 4  # 2 pairs per direction
    pairs = FlowPairs(samples)
    # into_future: frame i -> i+1 with flow i; into_past: frame i+1 -> i with flow i+1.
    got = [(levels(pairs[i]), float(pairs[i]["flow"][0, 0, 0])) for i in range(4)]
    assert got == [((100, 101), 1.0), ((101, 102), 2.0), ((101, 100), -2.0), ((102, 101), -3.0)]


def test_sintel_pairs_within_scenes_and_submission_names(data_dir: Path) -> None:
    train = SintelIndex(data_dir / "Sintel").pairs("training", "clean")
    assert len(train) == 3  # 2 in alley_1, 1 in bamboo_1: never across scenes
    assert [s.new_sequence for s in train] == [True, False, True]
    assert levels(FlowPairs(train)[2]) == (20, 21)
    test = SintelIndex(data_dir / "Sintel").pairs("test", "final")
    assert [s.name for s in test] == [
        "final/ambush_1/frame0001.flo",
        "final/ambush_1/frame0002.flo",
    ]
    assert all(s.flow is None for s in test)


def test_kitti_sparse_valid_mask(data_dir: Path) -> None:
    sample = FlowPairs(KittiIndex(data_dir / "KITTI").pairs("training"))[1]
    assert levels(sample) == (31, 41)
    assert torch.equal(sample["valid"].bool(), torch.from_numpy(kitti_valid()))
    assert torch.allclose(sample["flow"][0], torch.full((H, W), 1.5))
    assert [s.name for s in KittiIndex(data_dir / "KITTI").pairs("testing")] == [
        "000000_10.png",
        "000001_10.png",
    ]


def test_hd1k_pairs_never_cross_sequences(data_dir: Path) -> None:
    samples = HD1KIndex(data_dir / "HD1k").pairs()
    assert [s.flow.name for s in samples] == [
        "000000_0000.png",
        "000000_0001.png",
        "000001_0000.png",
    ]
    assert levels(FlowPairs(samples)[2]) == (50, 51)


# ----------------------------------------------------------------------------------------------
# DataModules
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, val_sets, n_train",
    [
        ("chairs", ["chairs"], 2),
        ("things", ["things_clean", "kitti"], 8),
        ("sintel", ["sintel_clean", "sintel_final"], 6),
        ("kitti", ["kitti"], 2),
        ("hd1k", ["hd1k"], 3),
    ],
)
def test_datamodule_batches(data_dir: Path, name: str, val_sets: list[str], n_train: int) -> None:
    dm = preset(name, data_dir, batch_size=2, num_workers=0, crop_size=CROP, val_sets=val_sets)
    dm.setup("fit")
    assert len(dm.train_set) == n_train
    batch = next(iter(dm.train_dataloader()))
    assert batch["image1"].shape == (2, 3, *CROP) and batch["flow"].shape == (2, 2, *CROP)
    assert batch["valid"].shape == (2, *CROP) and batch["image1"].dtype == torch.float32
    loaders = dm.val_dataloader()
    assert len(loaders) == len(val_sets) == len(dm.val_names)
    full = next(iter(loaders[0]))
    assert full["image1"].shape == (1, 3, H, W)  # whole frames for evaluation


@pytest.mark.parametrize(
    "name, parts",
    [
        ("chairs", {"chairs": (-0.1, 1.0, True, False)}),
        ("things", {f"things_{p}": (-0.4, 0.8, True, False) for p in ("clean", "final")}),
        ("sintel", {f"sintel_{p}": (-0.2, 0.6, True, False) for p in ("clean", "final")}),
        ("kitti", {"kitti": (-0.2, 0.4, False, True)}),
        ("hd1k", {"hd1k": (-0.5, 0.2, True, True)}),
    ],
)
def test_presets_hold_the_thesis_augmentation(name: str, parts: dict) -> None:
    """The values of the deq-flow ``fetch_dataloader`` stages, read from conf/data only."""
    got = preset(name, Path("unused")).train_parts()
    assert {
        k: (a.min_scale, a.max_scale, a.do_flip, a.sparse) for k, (_, a) in got.items()
    } == parts
    assert all(repeats == 1 for repeats, _ in got.values())


def test_hd1k_preset_composes_and_loads_its_real_layout(tmp_path: Path) -> None:
    make_hd1k(tmp_path, folder="hd1k")  # torchvision's folder name
    cfg = compose_cfg(
        ["experiment=flow_tiny", "data=hd1k", f"data.data_dir={tmp_path}", "data.batch_size=2",
         "data.num_workers=0", f"data.crop_size=[{CROP[0]},{CROP[1]}]"],
        tmp_path / "run",
    )  # fmt: skip
    dm = instantiate(cfg.data, _convert_="all")
    dm.setup("fit")
    assert [s.flow.name for s in dm.train_set.samples] == [
        "000000_0000.png",
        "000000_0001.png",
        "000001_0000.png",
    ]
    batch = next(iter(dm.train_dataloader()))
    assert batch["flow"].shape == (2, 2, *CROP) and dm.train_set.augment.sparse
    (loader,) = dm.val_dataloader()
    full = next(iter(loader))
    assert torch.equal(full["valid"][0].bool(), torch.from_numpy(kitti_valid()))
    assert torch.allclose(full["flow"][0, 0], torch.zeros(H, W))  # frame 0's flow: const 0


def test_predict_sets_for_submissions(data_dir: Path) -> None:
    dm = preset("sintel", data_dir, batch_size=2, num_workers=0)
    dm.setup("predict")
    clean, final = dm.predict_dataloader()
    first = next(iter(clean))
    assert first["name"] == ["clean/ambush_1/frame0001.flo"] and first["new_sequence"].tolist() == [
        True
    ]
    assert "flow" not in first and len(final) == 2
    kitti = preset("kitti", data_dir, batch_size=2, num_workers=0)
    kitti.setup("predict")
    assert next(iter(kitti.predict_dataloader()[0]))["name"] == ["000000_10.png"]
    chairs = preset("chairs", data_dir, batch_size=2, num_workers=0)
    with pytest.raises(ValueError, match=r"data=chairs has no .*data.predict_sets"):
        chairs.setup("predict")


def test_mix_repeats_parts_with_their_augmentation(data_dir: Path) -> None:
    thesis = {"sintel_clean": 100, "sintel_final": 100, "kitti": 200, "hd1k": 5, "things_clean": 1}
    mix = preset("flow_mix", data_dir)
    assert mix.hparams.weights == thesis
    scales = {k: (a.min_scale, a.max_scale, a.sparse) for k, (_, a) in mix.train_parts().items()}
    assert scales == {
        "sintel_clean": (-0.2, 0.6, False),
        "sintel_final": (-0.2, 0.6, False),
        "kitti": (-0.3, 0.5, True),
        "hd1k": (-0.5, 0.2, True),
        "things_clean": (-0.2, 0.6, False),
    }
    no_flip = preset("flow_mix", data_dir, part_augment={"sintel": {"do_flip": False}})
    flips = {k: a.do_flip for k, (_, a) in no_flip.train_parts().items()}
    assert flips == {"sintel_clean": False, "sintel_final": False, "kitti": True, "hd1k": True,
                     "things_clean": True}  # fmt: skip
    weights = {"sintel_clean": 2, "sintel_final": 0, "kitti": 3, "hd1k": 1, "things_clean": 1}
    dm = preset("flow_mix", data_dir, batch_size=2, num_workers=0, crop_size=CROP, weights=weights)
    dm.setup("fit")
    # Sintel clean 3 pairs, KITTI 2, HD1K 3, Things clean TRAIN 4.
    assert len(dm.train_set) == 2 * 3 + 3 * 2 + 1 * 3 + 1 * 4
    flags = [(ds.samples[0].flow.suffix, ds.augment.sparse) for ds in dm.train_set.datasets]
    assert set(flags) == {(".flo", False), (".png", True), (".pfm", False)}
    batch = next(iter(dm.train_dataloader()))
    assert batch["flow"].shape == (2, 2, *CROP)


def test_layout_errors_are_actionable(tmp_path: Path) -> None:
    with pytest.raises(DatasetLayoutError, match="FlyingChairs_release") as err:
        preset("chairs", tmp_path, batch_size=2, num_workers=0).setup("fit")
    assert "Expected layout" in str(err.value) and "data.data_dir" in str(err.value)
    make_chairs(tmp_path)
    (tmp_path / "FlyingChairs_release" / "chairs_split.txt").unlink()
    with pytest.raises(DatasetLayoutError, match=r"chairs_split.txt"):
        ChairsIndex(tmp_path / "FlyingChairs_release").pairs("train")
    make_sintel(tmp_path)
    (tmp_path / "Sintel/training/flow/alley_1/frame_0002.flo").unlink()
    with pytest.raises(DatasetLayoutError, match="alley_1"):
        SintelIndex(tmp_path / "Sintel").pairs("training", "clean")


@pytest.mark.parametrize(
    "name, overrides, match",
    [
        ("chairs", {"val_sets": ["chair"]}, r"data.val_sets: unknown name\(s\) \['chair'\]"),
        ("flow_mix", {"weights": {"sintels": 1}}, r"data.weights: unknown"),
        ("flow_mix", {"weights": {"kitti": 0}}, r"non-negative integers, not all 0"),
        ("things", {"passes": []}, r"data.passes must name some of"),
        ("sintel", {"passes": ["albedo"]}, r"data.passes: unknown"),
        ("flow_mix", {"part_augment": {"chair": {}}}, r"data.part_augment: unknown"),
        ("flow_mix", {"part_augment": {"kitti": {"scale": 1}}}, r"part_augment.kitti: unknown"),
    ],
)
def test_bad_preset_values_name_the_key(name: str, overrides: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        preset(name, Path("unused"), **overrides)


# ----------------------------------------------------------------------------------------------
# Augmentation: after scaling, stretching, flipping and cropping, the flow must still map frame 1
# onto frame 2. Checked on synthetic pairs whose ground truth is exact.
# ----------------------------------------------------------------------------------------------


def warp_error(
    img1: torch.Tensor, img2: torch.Tensor, flow: torch.Tensor, mask: torch.Tensor
) -> float:
    """Mean |img1(x) - img2(x + flow(x))| over masked pixels that land inside frame 2."""
    h, w = flow.shape[1:]
    ys, xs = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    x2, y2 = xs + flow[0], ys + flow[1]
    grid = torch.stack([2 * x2 / (w - 1) - 1, 2 * y2 / (h - 1) - 1], -1)[None]
    warped = F.grid_sample(img2[None], grid, align_corners=True)[0]
    inside = (x2 >= 0) & (x2 <= w - 1) & (y2 >= 0) & (y2 <= h - 1) & mask.bool()
    return float((warped - img1).abs().mean(0)[inside].mean())


@pytest.fixture(scope="module")
def pairs() -> SyntheticFlowPairs:
    photos = load_skimage_photos(["gravel"], 200)  # textured everywhere
    return SyntheticFlowPairs(photos, 6, crop_size=96, max_translation=5.0, max_objects=0, seed=3)


def test_synthetic_ground_truth_is_exact(pairs: SyntheticFlowPairs) -> None:
    for i in range(3):
        s = pairs[i]
        ones = torch.ones(96, 96)
        exact = warp_error(s["image1"], s["image2"], s["flow"], ones)
        wrong = warp_error(s["image1"], s["image2"], torch.zeros_like(s["flow"]), ones)
        assert exact < 3.0 and wrong > 10.0  # only pixel noise (sigma < 3) and resampling remain


@pytest.mark.parametrize("seed", range(6))
def test_dense_augmentation_keeps_flow_consistent(pairs: SyntheticFlowPairs, seed: int) -> None:
    s = pairs[seed]
    torch.manual_seed(seed)
    aug = FlowAugmentor((48, 64), min_scale=-0.4, max_scale=0.6, do_flip=True)
    img1, img2, flow, valid = aug.spatial(s["image1"], s["image2"], s["flow"], s["valid"])
    assert img1.shape == (3, 48, 64) and flow.shape == (2, 48, 64) and valid.shape == (48, 64)
    assert warp_error(img1, img2, flow, valid) < 4.0


@pytest.mark.parametrize("seed", range(6))
def test_sparse_augmentation_moves_valid_pixels(pairs: SyntheticFlowPairs, seed: int) -> None:
    s = pairs[seed]
    sparse_valid = (torch.rand(96, 96, generator=torch.Generator().manual_seed(seed)) < 0.3).float()
    flow = s["flow"] * sparse_valid  # invalid pixels hold zeros, as in KITTI files
    torch.manual_seed(seed)
    aug = FlowAugmentor((48, 64), min_scale=-0.4, max_scale=0.6, do_flip=True, sparse=True)
    img1, img2, flow, valid = aug.spatial(s["image1"], s["image2"], flow, sparse_valid)
    assert set(valid.unique().tolist()) <= {0.0, 1.0} and valid.sum() > 50
    assert torch.all(flow[:, valid == 0] == 0)  # no interpolation into invalid pixels
    assert warp_error(img1, img2, flow, valid) < 4.0


def test_resize_sparse_flow_by_hand() -> None:
    flow = torch.zeros(2, 4, 4)
    valid = torch.zeros(4, 4)
    flow[:, 1, 2] = torch.tensor([1.0, -2.0])
    valid[1, 2] = 1
    valid[3, 0] = 1  # a valid zero-flow pixel stays valid
    new_flow, new_valid = resize_sparse_flow(flow, valid, (8, 12))  # y x2, x x3
    # pixel centre (2.5, 1.5) -> (7.5, 3.0) - 0.5 = (7, 2.5) -> nearest (7, 2)
    assert new_valid.sum() == 2 and new_valid[2, 7] == 1 and new_valid[6, 1] == 1
    assert new_flow[:, 2, 7].tolist() == [3.0, -4.0]
    assert new_flow.abs().sum() == 7.0


def test_photometric_augmentation_and_eraser_touch_only_images() -> None:
    torch.manual_seed(0)
    aug = FlowAugmentor(CROP, 0.0, 0.0, do_flip=False)
    img1 = torch.randint(0, 256, (3, H, W), dtype=torch.uint8)
    img2 = img1.clone()
    changed = False
    for _ in range(10):
        a, b = aug.color(img1, img2)
        assert a.dtype == torch.float32 and a.shape == img1.shape
        changed |= not torch.equal(a, img1.float())
        erased = FlowAugmentor.erase(b)
        assert erased.shape == b.shape
    assert changed


# ----------------------------------------------------------------------------------------------
# The synthetic default
# ----------------------------------------------------------------------------------------------


def test_synthetic_datamodule(tmp_path: Path) -> None:
    kwargs = dict(batch_size=4, num_workers=0, seed=1, train_size=8, val_size=6, test_size=5)
    dm = SyntheticFlowDataModule(**kwargs)
    dm.setup("fit")
    again = SyntheticFlowDataModule(**kwargs)
    again.setup("fit")
    assert torch.equal(dm.val_set[2]["flow"], again.val_set[2]["flow"])  # fixed by the seed
    assert not torch.equal(dm.val_set[2]["flow"], dm.val_set[3]["flow"])
    assert not torch.equal(dm.test_set[0]["image1"], dm.val_set[0]["image1"])
    # The zero-flow baseline, recomputed through the metric functions.
    sums = None
    for batch in dm.val_dataloader():
        s = flow_metric_sums(torch.zeros_like(batch["flow"]), batch["flow"], batch["valid"])
        sums = s if sums is None else {k: sums[k] + s[k] for k in s}
    assert finalize_flow_metrics(sums)["epe"].item() == pytest.approx(dm.epe_zero["val"], rel=1e-6)
    assert 1.0 < dm.epe_zero["val"] < 20.0
    batch = next(iter(dm.train_dataloader()))
    assert batch["image1"].shape == (4, 3, 64, 64) and batch["flow"].shape == (4, 2, 64, 64)
    assert batch["image1"].min() >= 0 and batch["image1"].max() <= 255
    with pytest.raises(ValueError, match=r"data.crop_size"):
        SyntheticFlowDataModule(crop_size=60)
