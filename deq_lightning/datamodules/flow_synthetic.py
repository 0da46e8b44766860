"""The embedded optical-flow default: synthetic pairs from scikit-image's photographs, with exact
ground truth and no download, trainable on a CPU."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from deq_lightning.datamodules.checks import check_train_size
from deq_lightning.datamodules.common import eval_loader, per_device_batch_size
from deq_lightning.metrics.flow import flow_length

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
            total += float(flow_length(flow, dim=0).double().sum())
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
