import itertools
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from deq_lightning.datamodules.common import DatasetLayoutError
from deq_lightning.datamodules.segmentation import (
    CITYSCAPES_CLASS_NAMES,
    CITYSCAPES_LABEL_IDS,
    CITYSCAPES_PALETTE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    CityscapesDataModule,
    ImageFiles,
    RandomScaleCropFlip,
    SyntheticSegDataModule,
    colorize,
    label_ids_to_train_ids,
    render_scenes,
    train_ids_to_label_ids,
)

# ----------------------------------------------------------------------------------------------
# Cityscapes label ids
# ----------------------------------------------------------------------------------------------


def test_label_ids_map_to_the_19_train_ids():
    # A hand-made labelIds image: every evaluated id, and void/unused ids (0 unlabeled, 1 ego
    # vehicle, 6 ground, 9 parking, 14 guard rail, 29 caravan, 30 trailer, 34 and 200 unknown).
    label_ids = np.array(
        [
            [7, 8, 11, 12, 13],
            [17, 19, 20, 21, 22],
            [23, 24, 25, 26, 27],
            [28, 31, 32, 33, 0],
            [1, 6, 9, 14, 29],
            [30, 34, 200, 255, 7],
        ],
        dtype=np.uint8,
    )
    expected = np.array(
        [
            [0, 1, 2, 3, 4],
            [5, 6, 7, 8, 9],
            [10, 11, 12, 13, 14],
            [15, 16, 17, 18, 255],
            [255, 255, 255, 255, 255],
            [255, 255, 255, 255, 0],
        ],
        dtype=np.uint8,
    )
    np.testing.assert_array_equal(label_ids_to_train_ids(label_ids), expected)
    # int32 input (e.g. read by another library) maps the same way
    np.testing.assert_array_equal(label_ids_to_train_ids(label_ids.astype(np.int32)), expected)
    with pytest.raises(ValueError, match=r"0\.\.33"):
        label_ids_to_train_ids(np.array([[-1, 7]]))


def test_train_ids_back_to_label_ids_and_palette():
    train_ids = np.array([[0, 1, 2], [10, 18, 255]], dtype=np.uint8)
    np.testing.assert_array_equal(
        train_ids_to_label_ids(train_ids, CITYSCAPES_LABEL_IDS), [[7, 8, 11], [23, 33, 0]]
    )
    assert CITYSCAPES_CLASS_NAMES[0] == "road" and CITYSCAPES_CLASS_NAMES[-1] == "bicycle"
    assert len(CITYSCAPES_CLASS_NAMES) == len(CITYSCAPES_PALETTE) == 19
    colours = colorize(train_ids, CITYSCAPES_PALETTE)
    assert tuple(colours[0, 0]) == (128, 64, 128)  # road
    assert tuple(colours[1, 0]) == (70, 130, 180)  # sky
    assert tuple(colours[1, 2]) == (0, 0, 0)  # ignored


# ----------------------------------------------------------------------------------------------
# Cityscapes on disk
# ----------------------------------------------------------------------------------------------


def write_cityscapes(root: Path, width: int = 32, height: int = 16, seed: int = 0) -> Path:
    """A tiny Cityscapes tree: train (2 cities x 2), val (1 x 2), test (1 x 1)."""
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


def test_cityscapes_loader_reads_the_real_layout(tmp_path):
    root = write_cityscapes(tmp_path / "cityscapes")
    dm = CityscapesDataModule(
        data_dir=str(tmp_path),  # the parent of cityscapes/ works too
        batch_size=2,
        eval_batch_size=1,
        num_workers=0,
        crop_size=(8, 16),
        base_size=32,
    )
    assert (dm.num_classes, dm.in_channels, dm.label_ids) == (19, 3, CITYSCAPES_LABEL_IDS)
    assert dm.class_weights is not None and len(dm.class_weights) == 19
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (4, 2, 2)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (2, 3, 8, 16) and x.dtype == torch.float32
    assert y.shape == (2, 8, 16) and y.dtype == torch.long
    assert set(y.unique().tolist()) <= {*range(19), 255}
    # Validation: full resolution, labels mapped exactly, image normalised with ImageNet stats.
    (image_path, label_path) = dm.val_set.pairs[0]
    assert image_path.name == "valcity0_000000_000000_leftImg8bit.png"
    assert label_path == root / "gtFine/val/valcity0/valcity0_000000_000000_gtFine_labelIds.png"
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (1, 3, 16, 32)
    expected = label_ids_to_train_ids(np.asarray(Image.open(label_path)))
    np.testing.assert_array_equal(y[0].numpy(), expected)
    rgb = torch.from_numpy(np.array(Image.open(image_path))).permute(2, 0, 1).float() / 255
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(x[0], (rgb - mean) / std, atol=1e-6)


def test_cityscapes_test_split_on_request_and_pickles(tmp_path):
    write_cityscapes(tmp_path)
    dm = CityscapesDataModule(data_dir=str(tmp_path), batch_size=1, test_split="test")
    dm.setup("test")
    assert len(dm.test_set) == 1 and dm.test_set is not dm.val_set
    clone = pickle.loads(pickle.dumps(dm))  # ddp_spawn sends the datamodule to each process
    assert clone.hparams.test_split == "test"


def test_missing_labels_and_folders_name_the_layout(tmp_path):
    root = write_cityscapes(tmp_path)
    (root / "gtFine/val/valcity0/valcity0_000000_000001_gtFine_labelIds.png").unlink()
    dm = CityscapesDataModule(data_dir=str(root), batch_size=1)
    with pytest.raises(DatasetLayoutError) as info:
        dm.setup()
    msg = str(info.value)
    assert "1 of 2 val images have no label file" in msg
    assert "gtFine/val/valcity0/valcity0_000000_000001_gtFine_labelIds.png" in msg
    assert "data.data_dir" in msg and "leftImg8bit/{train,val,test}/<city>" in msg
    with pytest.raises(DatasetLayoutError, match="nothing found"):
        CityscapesDataModule(data_dir=str(tmp_path / "nope"), batch_size=1).setup()
    empty = tmp_path / "empty"
    (empty / "leftImg8bit" / "train").mkdir(parents=True)
    with pytest.raises(DatasetLayoutError, match="holds no <city>/"):
        CityscapesDataModule(data_dir=str(empty), batch_size=1).setup()


def test_colour_label_images_are_refused(tmp_path):
    root = write_cityscapes(tmp_path)
    label = root / "gtFine/val/valcity0/valcity0_000000_000000_gtFine_labelIds.png"
    Image.fromarray(np.zeros((16, 32, 3), dtype=np.uint8)).save(label)
    dm = CityscapesDataModule(data_dir=str(root), batch_size=1)
    dm.setup()
    with pytest.raises(ValueError, match="gtFine_color"):
        dm.val_set[0]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(crop_size=(8,)), "crop_size is \\[height, width\\]"),
        (dict(scale_range=(2.0, 1.0)), "scale_range"),
        (dict(test_split="train"), "test_split"),
        (dict(class_weights=[1.0, 2.0]), "19 positive numbers"),
    ],
)
def test_cityscapes_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CityscapesDataModule(**kwargs)


# ----------------------------------------------------------------------------------------------
# Training augmentation
# ----------------------------------------------------------------------------------------------


def stripes(height: int, width: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A label of vertical stripes (class = column // 4) and an image that encodes it."""
    label = (torch.arange(width) // 4).expand(height, width).clone()
    image = (label * 20).to(torch.uint8).expand(3, height, width).clone()
    return image, label


def test_augmentation_keeps_image_and_label_aligned():
    image, label = stripes(16, 32)
    aug = RandomScaleCropFlip((16, 32), 32, (1.0, 1.0), (0, 0, 0), (1 / 255,) * 3, flip=True)
    seen_flip = seen_plain = False
    for _ in range(20):
        x, y = aug(image, label)
        assert x.shape == (3, 16, 32) and y.shape == (16, 32)
        np.testing.assert_allclose(x[0].numpy(), (y * 20).numpy(), atol=1e-4)
        seen_flip |= torch.equal(y, label.flip(-1))
        seen_plain |= torch.equal(y, label)
    assert seen_flip and seen_plain


def test_augmentation_scales_and_pads_with_ignore():
    image, label = stripes(16, 32)
    # Scale 0.5 of base size 32: the image becomes 8 x 16, padded to the 16 x 32 crop.
    aug = RandomScaleCropFlip((16, 32), 32, (0.5, 0.5), (0, 0, 0), (1, 1, 1), flip=False)
    x, y = aug(image, label)
    assert y.shape == (16, 32)
    assert (y[8:] == 255).all() and (y[:, 16:] == 255).all()
    np.testing.assert_array_equal(y[:8, :16].numpy(), (label[::2, ::2]).numpy())
    assert (x[:, 8:] == 0).all()  # black padding (before normalisation, as the reference)
    # Scale 2: the crop is a window of the doubled image, each class two pixels wider.
    aug = RandomScaleCropFlip((16, 32), 32, (2.0, 2.0), (0, 0, 0), (1, 1, 1), flip=False)
    _, y = aug(image, label)
    assert (y != 255).all()
    runs = [len(list(g)) for _, g in itertools.groupby(y[0].tolist())]
    assert max(runs) == 8


# ----------------------------------------------------------------------------------------------
# Synthetic scenes
# ----------------------------------------------------------------------------------------------


def test_render_scenes_masks_are_exact():
    glyph = np.zeros((1, 8, 8), dtype=np.float32)
    glyph[0, 2:6, 2:6] = 1.0  # a square, upsampled to 16 x 16
    bg = [np.full((64, 64, 3), 0.5, dtype=np.float32)]
    rng = np.random.default_rng(0)
    images, labels = render_scenes(
        4, 24, glyph, np.array([3], dtype=np.uint8), bg, rng, (1, 1), (16, 16)
    )
    background = round(255 * (0.05 + 0.4 * 0.5))  # the dimmed flat texture
    for img, lab in zip(images, labels):
        core = lab == 3
        assert core.sum() > 0 and set(np.unique(lab)) == {0, 3, 255}
        # A digit pixel is at least half digit colour, an edge (ignored) pixel less than half,
        # a background pixel at most 15 %.
        rows, cols = np.where(core)
        colour = img[(rows.min() + rows.max()) // 2, (cols.min() + cols.max()) // 2].astype(int)
        to_digit = np.abs(img.astype(int) - colour).sum(-1)
        to_background = np.abs(img.astype(int) - background).sum(-1)
        contrast = np.abs(colour - background).sum()
        assert (to_digit[core] <= to_background[core] + 3).all()
        assert (to_digit[lab == 255] >= to_background[lab == 255] - 3).all()
        assert (to_background[lab == 0] <= 0.15 * contrast + 3).all()
        assert (img[:2] == background).all()  # far from the digit: the texture itself
        # The core is a square; the soft edge (255) surrounds it.
        assert core[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].all()


def test_synthetic_metadata_splits_and_determinism():
    dm = SyntheticSegDataModule(batch_size=4, n_train=20, n_val=6, n_test=5, digits=[3, 7])
    assert dm.num_classes == 3 and dm.class_names == ("background", "digit_3", "digit_7")
    assert dm.palette.shape == (3, 3) and dm.label_ids is None
    dm.setup()
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (20, 6, 5)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and y.shape == (4, 32, 32)
    labels = torch.cat([dm.train_set.labels.flatten(), dm.test_set.labels.flatten()])
    assert set(labels.unique().tolist()) == {0, 1, 2, 255}
    again = SyntheticSegDataModule(batch_size=4, n_train=20, n_val=6, n_test=5, digits=[3, 7])
    again.setup()
    assert torch.equal(again.test_set.images, dm.test_set.images)
    other = SyntheticSegDataModule(
        batch_size=4, n_train=20, n_val=6, n_test=5, digits=[3, 7], seed=1
    )
    other.setup()
    assert not torch.equal(other.test_set.images, dm.test_set.images)
    assert pickle.loads(pickle.dumps(dm)).hparams.digits == [3, 7]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(digits=[1, 1]), "distinct digits"),
        (dict(digits=[10]), "distinct digits"),
        (dict(objects=(0, 2)), "objects"),
        (dict(glyph_size=(12, 40)), "glyph_size"),
        (dict(n_val=0), "n_val"),
        (dict(image_size=8, glyph_size=(4, 8)), "image_size"),
        (dict(class_weights=[1.0]), "6 positive numbers"),
    ],
)
def test_synthetic_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SyntheticSegDataModule(**kwargs)


def test_image_files_lists_nested_images(tmp_path):
    for rel in ("b/x.png", "a.jpg", "notes.txt"):
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".txt":
            path.write_text("not an image")
        else:
            Image.fromarray(np.zeros((5, 7, 3), dtype=np.uint8)).save(path)
    files = ImageFiles(tmp_path, (0, 0, 0), (1, 1, 1))
    assert [files[i][1] for i in range(len(files))] == ["a", "b/x"]
    assert files[0][0].shape == (3, 5, 7)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no images"):
        ImageFiles(tmp_path / "empty", (0, 0, 0), (1, 1, 1))
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        ImageFiles(tmp_path / "missing", (0, 0, 0), (1, 1, 1))
