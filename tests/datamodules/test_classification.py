import pickle
import shutil
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from PIL import Image
from torch import nn
from torchmetrics import SumMetric

from deq_lightning.datamodules.classification import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR10DataModule,
    ClassificationDataModule,
    DigitsDataModule,
    ImageArrayDataset,
    ImageNetDataModule,
)
from deq_lightning.datamodules.common import DatasetLayoutError

# ----------------------------------------------------------------------------------------------
# digits
# ----------------------------------------------------------------------------------------------


def labels_of(dataset) -> list[int]:
    return [dataset[i][1] for i in range(len(dataset))]


def test_digits_metadata_before_setup_and_pickles():
    dm = DigitsDataModule(batch_size=32)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 1, 8)
    clone = pickle.loads(pickle.dumps(dm))  # ddp_spawn sends the datamodule to each process
    assert clone.hparams.batch_size == 32


def test_digits_split_sizes_disjoint_and_stratified():
    dm = DigitsDataModule(batch_size=50, seed=3)
    dm.setup()
    sizes = [len(dm.train_set), len(dm.val_set), len(dm.test_set)]
    assert sizes == [1257, 270, 270] and sum(sizes) == 1797
    splits = [set(s.indices.tolist()) for s in (dm.train_set, dm.val_set, dm.test_set)]
    assert not (splits[0] & splits[1] or splits[0] & splits[2] or splits[1] & splits[2])
    # every class keeps its share (about 15%, i.e. 26-28 of ~180 images) in val and test
    for split in (dm.val_set, dm.test_set):
        counts = Counter(labels_of(split))
        assert sorted(counts) == list(range(10))
        assert all(25 <= c <= 29 for c in counts.values()), counts
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (50, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.long
    train_pixels = torch.stack([dm.train_set[i][0] for i in range(len(dm.train_set))])
    assert abs(train_pixels.mean().item()) < 1e-4 and abs(train_pixels.std().item() - 1) < 1e-3


def test_digits_split_follows_the_seed():
    def test_indices(seed):
        dm = DigitsDataModule(seed=seed)
        dm.setup()
        return dm.test_set.indices.tolist()

    assert test_indices(0) == test_indices(0)
    assert test_indices(0) != test_indices(1)


def test_digits_rejects_bad_fractions():
    with pytest.raises(ValueError, match="val_fraction"):
        DigitsDataModule(val_fraction=0.5, test_fraction=0.5)


def test_batch_size_must_split_over_devices():
    class FakeTrainer:
        world_size = 3

    dm = DigitsDataModule(batch_size=64)
    dm.trainer = FakeTrainer()
    with pytest.raises(ValueError, match="multiple of 3"):
        dm.setup()


# ----------------------------------------------------------------------------------------------
# Exact evaluation under DDP: each image on exactly one rank, none repeated
# ----------------------------------------------------------------------------------------------


class TenImages(ClassificationDataModule):
    """Ten 2x2 images whose label is their index (the same ten in every split)."""

    num_classes, in_channels, image_size = 10, 1, 2

    def __init__(self, batch_size: int = 3, num_workers: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()

    def build_splits(self):
        images = ImageArrayDataset(torch.zeros(10, 1, 2, 2), torch.arange(10))
        return images, images, images


class CountLabels(pl.LightningModule):
    """Logs how many test images all ranks saw, and the sum of their labels."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(1, 1)
        self.count, self.label_sum = SumMetric(), SumMetric()

    def test_step(self, batch, batch_idx):
        _, y = batch
        self.count.update(len(y))
        self.label_sum.update(y.sum())
        self.log("test/count", self.count)
        self.log("test/label_sum", self.label_sum)


@pytest.mark.parametrize("loader", ["val_dataloader", "test_dataloader"])
def test_eval_loaders_split_ten_images_over_three_ranks_exactly(loader):
    seen = []
    for rank in range(3):
        dm = TenImages()
        dm.trainer = SimpleNamespace(world_size=3, global_rank=rank)
        dm.setup("validate")
        seen += [int(i) for _, y in getattr(dm, loader)() for i in y]
    assert sorted(seen) == list(range(10))  # Lightning's padded sampler: 12, two repeated


def test_three_processes_count_each_test_image_once(tmp_path):
    """Lightning keeps the unpadded sampler under a real 3-process run (gloo on CPU)."""
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=3,
        strategy="ddp_fork",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    (metrics,) = trainer.test(CountLabels(), datamodule=TenImages(), verbose=False)
    assert metrics == {"test/count": 10.0, "test/label_sum": 45.0}


# ----------------------------------------------------------------------------------------------
# CIFAR-10 (tiny files in the real pickle format)
# ----------------------------------------------------------------------------------------------

PER_BATCH = 6


def write_cifar(root: Path, per_batch: int = PER_BATCH) -> np.ndarray:
    """The layout of cifar-10-python.tar.gz with ``per_batch`` images per file; returns the
    training images as (N, 3, 32, 32) uint8."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    names = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"]
    train = []
    for i, name in enumerate([*names, "test_batch"]):
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [(i + j) % 10 for j in range(per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({b"batch_label": name.encode(), b"data": data, b"labels": labels}, f)
        if name != "test_batch":
            train.append(data)
    meta = {b"label_names": [f"class{i}".encode() for i in range(10)], b"num_vis": 3072}
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f)
    return np.concatenate(train).reshape(-1, 3, 32, 32)


@pytest.mark.parametrize("point_at", ["parent", "batches_folder"])
def test_cifar_reads_pickles(tmp_path, point_at):
    train_images = write_cifar(tmp_path)
    data_dir = tmp_path if point_at == "parent" else tmp_path / "cifar-10-batches-py"
    dm = CIFAR10DataModule(str(data_dir), batch_size=4, num_workers=0, val_size=5, augment=False)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (10, 3, 32)
    dm.setup()
    assert dm.class_names == [f"class{i}" for i in range(10)]
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (25, 5, PER_BATCH)
    # the first training image, normalised with the thesis's mean/std, without augmentation
    i = int(dm.train_set.indices[0])
    x, y = dm.train_set[0]
    mean, std = torch.tensor(CIFAR10_MEAN)[:, None, None], torch.tensor(CIFAR10_STD)[:, None, None]
    expected = (torch.from_numpy(train_images[i]).float() / 255 - mean) / std
    torch.testing.assert_close(x, expected)
    assert y == (i // PER_BATCH + i % PER_BATCH) % 10
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, 32, 32) and x.dtype == torch.float32


def test_cifar_val_split_is_seeded_and_zero_means_test(tmp_path):
    write_cifar(tmp_path)

    def val_indices(seed):
        dm = CIFAR10DataModule(str(tmp_path), num_workers=0, seed=seed, val_size=5)
        dm.setup()
        return dm.val_set.indices.tolist()

    assert val_indices(0) == val_indices(0) != val_indices(1)
    dm = CIFAR10DataModule(str(tmp_path), num_workers=0, val_size=0)
    dm.setup()
    assert dm.val_set is dm.test_set and len(dm.train_set) == 5 * PER_BATCH


def test_cifar_augmentation_crops_and_flips_train_only(tmp_path):
    write_cifar(tmp_path)
    dm = CIFAR10DataModule(str(tmp_path), num_workers=0, val_size=5, augment=True)
    dm.setup()
    draws = torch.stack([dm.train_set[0][0] for _ in range(8)])
    assert not all(torch.equal(draws[0], d) for d in draws[1:])
    assert draws.shape == (8, 3, 32, 32)
    assert torch.equal(dm.val_set[0][0], dm.val_set[0][0])


def cifar_error(data_dir) -> str:
    with pytest.raises(DatasetLayoutError) as info:
        CIFAR10DataModule(str(data_dir), num_workers=0).setup()
    message = str(info.value)
    assert "data.data_dir" in message and "data_batch_1" in message  # names key and layout
    return message


def test_cifar_missing_folder(tmp_path):
    assert "nothing found" in cifar_error(tmp_path / "nowhere")


def test_cifar_missing_file(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    assert "missing files ['data_batch_3']" in cifar_error(tmp_path)


def test_cifar_not_a_pickle(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_text("not a pickle")
    assert "test_batch is not a CIFAR-10 pickle" in cifar_error(tmp_path)


def test_cifar_wrong_shape(tmp_path):
    write_cifar(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_2", "wb") as f:
        pickle.dump({b"data": np.zeros((4, 100), np.uint8), b"labels": [0, 1, 2, 3]}, f)
    assert "data_batch_2: b'data' is uint8 (4, 100)" in cifar_error(tmp_path)


def test_cifar_bad_labels(tmp_path):
    write_cifar(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_4", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}, f)
    assert "integers in 0..9" in cifar_error(tmp_path)


def test_cifar_meta_without_names(tmp_path):
    write_cifar(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "batches.meta", "wb") as f:
        pickle.dump({b"num_vis": 3072}, f)
    assert "label_names" in cifar_error(tmp_path)


class Boom:
    def __reduce__(self):
        return (print, ("this must not run",))


def test_cifar_refuses_pickles_that_run_code(tmp_path, capsys):
    write_cifar(tmp_path)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Boom(), b"labels": []}, f)
    assert "refusing to load builtins.print" in cifar_error(tmp_path)
    assert "must not run" not in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------
# ImageNet (a tiny ImageFolder tree)
# ----------------------------------------------------------------------------------------------

WNIDS = ["n01440764", "n01443537", "n01484850"]


def write_imagenet(root: Path, per_class: int = 2, classes=WNIDS, val_classes=None) -> Path:
    rng = np.random.default_rng(0)
    for split, wnids in (("train", classes), ("val", val_classes or classes)):
        for k, wnid in enumerate(wnids):
            folder = root / split / wnid
            folder.mkdir(parents=True)
            for j in range(per_class):
                size = (40 + 10 * j, 30 + 5 * k)  # images of different sizes and aspect ratios
                pixels = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
                ext = "JPEG" if j % 2 == 0 else "png"
                Image.fromarray(pixels).save(folder / f"{wnid}_{j}.{ext}")
    return root


@pytest.mark.parametrize("nested", [False, True])
def test_imagenet_reads_image_folders(tmp_path, nested):
    write_imagenet(tmp_path / "images" if nested else tmp_path)
    dm = ImageNetDataModule(str(tmp_path), batch_size=3, num_workers=0, image_size=32)
    assert (dm.num_classes, dm.in_channels, dm.image_size) == (3, 3, 32)
    assert dm.class_names == WNIDS
    dm.setup()
    assert len(dm.train_set) == len(dm.val_set) == 6 and dm.test_set is dm.val_set
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (3, 3, 32, 32) and x.dtype == torch.float32
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (3, 3, 32, 32) and y.tolist() == [0, 0, 1]


def test_imagenet_eval_transform_is_resize_then_center_crop(tmp_path):
    write_imagenet(tmp_path, per_class=1)
    dm = ImageNetDataModule(str(tmp_path), num_workers=0)
    names = [type(t).__name__ for t in dm.transform(train=False).transforms]
    assert names[:2] == ["Resize", "CenterCrop"]
    assert dm.transform(train=False).transforms[0].size == 256
    train = [type(t).__name__ for t in dm.transform(train=True).transforms]
    assert train[:2] == ["RandomResizedCropAndInterpolation", "RandomHorizontalFlip"]
    assert not any("Jitter" in name for name in train)


def imagenet_error(data_dir) -> str:
    with pytest.raises(DatasetLayoutError) as info:
        ImageNetDataModule(str(data_dir), num_workers=0).setup()
    message = str(info.value)
    assert "data.data_dir" in message and "train/<wnid>/*.JPEG" in message
    return message


def test_imagenet_missing_split(tmp_path):
    write_imagenet(tmp_path)
    shutil.rmtree(tmp_path / "val")
    assert "no val folder" in imagenet_error(tmp_path)


def test_imagenet_empty_class(tmp_path):
    write_imagenet(tmp_path)
    for f in (tmp_path / "train" / WNIDS[1]).iterdir():
        f.unlink()
    assert f"hold no images (.jpg/.jpeg/.png/...): ['{WNIDS[1]}']" in imagenet_error(tmp_path)


def test_imagenet_class_mismatch(tmp_path):
    write_imagenet(tmp_path, classes=WNIDS, val_classes=[*WNIDS[:2], "n99999999"])
    message = imagenet_error(tmp_path)
    assert f"only in train: ['{WNIDS[2]}'], only in val: ['n99999999']" in message


def test_imagenet_no_classes(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    assert "train/ has no class folders" in imagenet_error(tmp_path)
