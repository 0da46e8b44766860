"""Multiscale deep equilibrium model (MDEQ; Bai, Koltun & Kolter, NeurIPS 2020; thesis ch. 4).

One layer f drives ``n`` resolution streams (each half the size of the previous one) to a joint
fixed point. f is two steps: a residual block per stream, then a multiscale fusion that sums
up- and downsampled copies of every stream into every other. The input enters f only through the
injection into the highest-resolution stream; the other streams start at, and are injected with,
zeros. Task heads read the equilibrium streams: :class:`MDEQClassifier` below (HRNet-style), and
a segmentation head reuses :class:`MDEQBackbone` the same way.

Architecture facts come from locuslab/deq ``MDEQ-Vision/lib/models/mdeq_core.py`` and
``mdeq.py`` (summarised in docs/thesis.md §2); default sizes are the thesis's CIFAR-10 model
``experiments/cifar/cls_mdeq_LARGE.yaml`` (channels [32, 64, 128, 256], head [14, 28, 56, 112],
final 1680, expansion 5, 8 groups, dropout 0.3, no stem downsampling, post-fuse GN not affine).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deq_lightning.deq import DEQ, DEQStats, VariationalDropout, apply_weight_norm
from deq_lightning.models.contract import ModelOutput


def conv3x3(c_in: int, c_out: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=bias)


def group_norm(groups: int, channels: int, affine: bool = True) -> nn.GroupNorm:
    if groups < 1 or channels % groups:
        raise ValueError(
            f"GroupNorm needs channels divisible by groups, got {channels} channels and {groups} "
            "groups; choose channels (and channels x expansion) that are multiples of num_groups, "
            "and of num_groups // 2 for the post-fusion norm"
        )
    return nn.GroupNorm(groups, channels, affine=affine)


def downsampled(size: int) -> int:
    """Output size of a stride-2 3x3 conv with padding 1 (``ceil(size / 2)``).

    Stream sizes follow this rule so that any input size works; the reference halves with
    ``H // 2`` and so needs sizes divisible by ``2 ** (n_streams - 1)``.
    """
    return (size + 1) // 2


# ----------------------------------------------------------------------------------------------
# f: per-stream residual blocks + multiscale fusion
# ----------------------------------------------------------------------------------------------


class ResidualBlock(nn.Module):
    """One stream's block: conv3x3 (C -> eC), GN, ReLU, conv3x3 (eC -> C), dropout, + injection,
    GN, + residual, ReLU, GN (reference ``BasicBlock``; the norms after every sum keep f
    well-conditioned, which is what lets the solver converge)."""

    def __init__(self, channels: int, expansion: float, num_groups: int, dropout: float) -> None:
        super().__init__()
        inner = int(expansion * channels)
        self.conv1 = conv3x3(channels, inner)
        self.gn1 = group_norm(num_groups, inner)
        self.conv2 = conv3x3(inner, channels)
        # One channel mask per DEQ forward: a fresh mask per solver step would leave f without a
        # fixed point.
        self.drop = VariationalDropout(dropout, shared_dims=(2, 3))
        self.gn2 = group_norm(num_groups, channels)
        self.gn3 = group_norm(num_groups, channels)

    def forward(self, z: Tensor, injection: Tensor | None = None) -> Tensor:
        out = self.drop(self.conv2(F.relu(self.gn1(self.conv1(z)))))
        if injection is not None:
            out = out + injection
        out = self.gn2(out)
        return self.gn3(F.relu(out + z))


def fusion_path(channels: Sequence[int], src: int, dst: int, num_groups: int) -> nn.Module:
    """The map from stream ``src`` to stream ``dst``.

    Down (``src < dst``): a chain of stride-2 conv3x3 + GN, ReLU between steps, channels changing
    at the last step. Up (``src > dst``): conv1x1 + GN; the caller resizes (nearest neighbour).
    """
    if src == dst:
        return nn.Identity()
    c_in, c_out = channels[src], channels[dst]
    if src > dst:
        return nn.Sequential(nn.Conv2d(c_in, c_out, 1, bias=False), group_norm(num_groups, c_out))
    layers: list[nn.Module] = []
    for step in range(dst - src):
        last = step == dst - src - 1
        c = c_out if last else c_in
        layers += [conv3x3(c_in, c, stride=2), group_norm(num_groups, c)]
        if not last:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class MultiscaleFusion(nn.Module):
    """Every stream receives the sum of all streams brought to its resolution, then
    ReLU -> conv1x1 -> GN(num_groups // 2)."""

    def __init__(
        self, channels: Sequence[int], num_groups: int, post_gn_affine: bool = False
    ) -> None:
        super().__init__()
        n = len(channels)
        # paths[dst][src]
        self.paths = nn.ModuleList(
            nn.ModuleList(fusion_path(channels, src, dst, num_groups) for src in range(n))
            for dst in range(n)
        )
        self.post = nn.ModuleList(
            nn.Sequential(
                nn.ReLU(),
                nn.Conv2d(c, c, 1, bias=False),
                group_norm(num_groups // 2, c, affine=post_gn_affine),
            )
            for c in channels
        )

    def forward(self, zs: Sequence[Tensor]) -> list[Tensor]:
        out = []
        for dst, (paths, post) in enumerate(zip(self.paths, self.post)):
            size = zs[dst].shape[-2:]
            total = zs[dst]
            for src, (path, z) in enumerate(zip(paths, zs)):
                if src == dst:
                    continue
                y = path(z)
                if src > dst:
                    y = F.interpolate(y, size=size, mode="nearest")
                total = total + y
            out.append(post(total))
        return out


class MultiscaleLayer(nn.Module):
    """MDEQ's f(z; x): residual block per stream (injection into stream 0 only), then fusion."""

    def __init__(
        self,
        channels: Sequence[int],
        expansion: float,
        num_groups: int,
        dropout: float,
        post_gn_affine: bool,
        weight_norm: bool,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            ResidualBlock(c, expansion, num_groups, dropout) for c in channels
        )
        self.fusion = MultiscaleFusion(channels, num_groups, post_gn_affine)
        if weight_norm:
            # The reference normalises the block convs and the post-fusion convs only.
            apply_weight_norm(self.blocks)
            apply_weight_norm(self.fusion.post)

    def forward(self, zs: Sequence[Tensor], injection: Tensor) -> list[Tensor]:
        streams = [
            block(z, injection if i == 0 else None)
            for i, (block, z) in enumerate(zip(self.blocks, zs))
        ]
        return self.fusion(streams)


# ----------------------------------------------------------------------------------------------
# Injection and backbone
# ----------------------------------------------------------------------------------------------


def injection_stem(
    in_channels: int,
    channels: int,
    downsample_times: int,
    n_streams: int,
    bn_momentum: float,
) -> nn.Sequential:
    """x -> the injection of stream 0.

    ``max(2, downsample_times)`` conv3x3 + BN + ReLU, the first ``downsample_times`` of stride 2
    (ImageNet: 2, so stream 0 is at 1/4 resolution; CIFAR: 0, all stride 1), then conv1x1 + BN +
    ReLU. As in the reference, that last conv1x1 is left out when there is no downsampling and at
    most two streams (the CIFAR TINY model).
    """
    layers: list[nn.Module] = []
    c_in = in_channels
    for i in range(max(2, downsample_times)):
        stride = 2 if i < downsample_times else 1
        layers += [
            conv3x3(c_in, channels, stride=stride),
            nn.BatchNorm2d(channels, momentum=bn_momentum),
            nn.ReLU(),
        ]
        c_in = channels
    if downsample_times > 0 or n_streams > 2:
        layers += [
            nn.Conv2d(channels, channels, 1, bias=False),
            nn.BatchNorm2d(channels, momentum=bn_momentum),
            nn.ReLU(),
        ]
    return nn.Sequential(*layers)


class MDEQBackbone(nn.Module):
    """Image -> (equilibrium streams, highest resolution first; :class:`DEQStats`).

    ``deq`` holds the :class:`~deq_lightning.deq.DEQ` settings (solver, budgets, backward mode).
    The thesis's CIFAR runs use Broyden with 18 forward / 20 backward steps, ``stop_mode="rel"``;
    its ImageNet and Cityscapes runs 26-27 / 27-30 steps, ``"abs"`` (docs/thesis.md §2-3).

    ``depth > 0`` builds the *layered twin* instead: ``depth`` copies of the same layer with
    their own weights, applied once each from the same zero streams with the same injection,
    trained by plain backprop (stats ``None``). Everything else (stem, heads, norms) is shared
    code, so DEQ and layered net differ only in how the layer is used.
    """

    # The weight-tied module f applies (task.compile=true compiles it; see tasks/base.py).
    equilibrium_cell = "layer"

    def __init__(
        self,
        in_channels: int = 3,
        channels: Sequence[int] = (32, 64, 128, 256),
        expansion: float = 5,
        num_groups: int = 8,
        dropout: float = 0.3,
        downsample_times: int = 0,
        post_gn_affine: bool = False,
        weight_norm: bool = True,
        bn_momentum: float = 0.1,
        depth: int = 0,
        deq: dict | None = None,
    ) -> None:
        super().__init__()
        if not channels:
            raise ValueError("channels must list at least one stream width, e.g. [24, 24]")
        if depth < 0:
            raise ValueError(f"model.depth must be 0 (DEQ) or a number of layers, got {depth}")
        if num_groups < 2:
            raise ValueError(
                f"num_groups must be >= 2 (the post-fusion GN uses num_groups // 2), "
                f"got {num_groups}"
            )
        if downsample_times < 0:
            raise ValueError(f"downsample_times must be >= 0, got {downsample_times}")
        self.channels = list(channels)
        self.injection = injection_stem(
            in_channels, self.channels[0], downsample_times, len(self.channels), bn_momentum
        )

        def layer() -> MultiscaleLayer:
            return MultiscaleLayer(
                self.channels, expansion, num_groups, dropout, post_gn_affine, weight_norm
            )

        self.depth = depth
        if depth:
            self.layers = nn.ModuleList(layer() for _ in range(depth))
            self.deq = None
        else:
            self.layer = layer()
            self.deq = DEQ(**(deq or {}))

    def initial_state(self, injection: Tensor) -> list[Tensor]:
        """Zeros for every stream, each half the size of the one above it."""
        b, _, h, w = injection.shape
        zs = []
        for c in self.channels:
            zs.append(injection.new_zeros(b, c, h, w))
            h, w = downsampled(h), downsampled(w)
        return zs

    def forward(self, x: Tensor) -> tuple[list[Tensor], DEQStats | None]:
        u = self.injection(x)
        if self.depth:
            zs = self.initial_state(u)
            for layer in self.layers:
                zs = layer(zs, u)
            return list(zs), None

        def f(z: Sequence[Tensor], index: Tensor | None = None) -> list[Tensor]:
            # ``index``: batch compaction (the DEQ solves only the rows still unconverged)
            return self.layer(z, u if index is None else u[index])

        zs, stats = self.deq(f, self.initial_state(u))
        return list(zs), stats


# ----------------------------------------------------------------------------------------------
# Classification
# ----------------------------------------------------------------------------------------------


class Bottleneck(nn.Module):
    """HRNet's bottleneck (1x1 -> 3x3 -> 1x1, 4x wider out) that widens each stream in the head.

    The three inner BNs are not affine, as in the reference head.
    """

    expansion = 4

    def __init__(self, c_in: int, planes: int, bn_momentum: float) -> None:
        super().__init__()
        c_out = planes * self.expansion

        def bn(c: int) -> nn.BatchNorm2d:
            return nn.BatchNorm2d(c, momentum=bn_momentum, affine=False)

        self.body = nn.Sequential(
            nn.Conv2d(c_in, planes, 1, bias=False),
            bn(planes),
            nn.ReLU(),
            conv3x3(planes, planes),
            bn(planes),
            nn.ReLU(),
            nn.Conv2d(planes, c_out, 1, bias=False),
            bn(c_out),
        )
        self.shortcut = (
            nn.Identity()
            if c_in == c_out
            else nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out, momentum=bn_momentum)
            )
        )

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class ClassificationHead(nn.Module):
    """Streams -> logits: widen every stream, fold them from the top down with stride-2 convs
    (downsample and add), conv1x1 to ``final_channels``, global average pool, linear."""

    def __init__(
        self,
        channels: Sequence[int],
        head_channels: Sequence[int],
        final_channels: int,
        num_classes: int,
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        if len(head_channels) != len(channels):
            raise ValueError(
                f"head_channels needs one entry per stream: {len(channels)} streams "
                f"(channels={list(channels)}) but head_channels={list(head_channels)}"
            )
        wide = [h * Bottleneck.expansion for h in head_channels]
        self.widen = nn.ModuleList(
            Bottleneck(c, h, bn_momentum) for c, h in zip(channels, head_channels)
        )
        self.down = nn.ModuleList(
            nn.Sequential(
                conv3x3(wide[i], wide[i + 1], stride=2, bias=True),
                nn.BatchNorm2d(wide[i + 1], momentum=bn_momentum),
                nn.ReLU(),
            )
            for i in range(len(wide) - 1)
        )
        self.final = nn.Sequential(
            nn.Conv2d(wide[-1], final_channels, 1),
            nn.BatchNorm2d(final_channels, momentum=bn_momentum),
            nn.ReLU(),
        )
        self.classifier = nn.Linear(final_channels, num_classes)

    def forward(self, streams: Sequence[Tensor]) -> Tensor:
        y = self.widen[0](streams[0])
        for down, widen, z in zip(self.down, self.widen[1:], streams[1:]):
            y = widen(z) + down(y)
        y = self.final(y).mean(dim=(2, 3))
        return self.classifier(y)


class MDEQModel(nn.Module):
    """An :class:`MDEQBackbone` read by a task head: ``forward(x) -> ModelOutput(head(streams),
    stats)``. The classifier and the segmenter differ only in their head and their defaults;
    ``backbone`` holds the other :class:`MDEQBackbone` arguments (in_channels, channels,
    expansion, num_groups, weight_norm, depth, ...), whose defaults are the thesis's."""

    def __init__(
        self, head: Callable[[list[int]], nn.Module], deq: dict | None, **backbone: Any
    ) -> None:
        super().__init__()
        self.backbone = MDEQBackbone(deq=deq, **backbone)
        self.head = head(self.backbone.channels)

    @property
    def deq(self) -> DEQ | None:
        return self.backbone.deq

    def forward(self, x: Tensor) -> ModelOutput:
        streams, stats = self.backbone(x)
        return ModelOutput(self.head(streams), stats)


class MDEQClassifier(MDEQModel):
    """MDEQ image classifier: ``forward(x) -> ModelOutput(logits, stats)``.

    Defaults are the thesis's CIFAR-10 model (``cls_mdeq_LARGE.yaml``, also
    :class:`MDEQBackbone`'s); the other thesis settings are listed in the project README /
    experiment configs.
    """

    def __init__(
        self,
        num_classes: int = 10,
        head_channels: Sequence[int] = (14, 28, 56, 112),
        final_channels: int = 1680,
        bn_momentum: float = 0.1,
        deq: dict | None = None,
        **backbone: Any,
    ) -> None:
        def head(channels: list[int]) -> ClassificationHead:
            return ClassificationHead(
                channels, head_channels, final_channels, num_classes, bn_momentum
            )

        super().__init__(head, deq, bn_momentum=bn_momentum, **backbone)


# ----------------------------------------------------------------------------------------------
# Segmentation
# ----------------------------------------------------------------------------------------------
# The backbone above, unchanged, drives every resolution stream to a joint fixed point; the head
# only reads the equilibrium: each stream is upsampled (bilinear) to the highest stream's
# resolution, the streams are concatenated, and a conv1x1 + BN + ReLU mixes them before a
# per-pixel classifier (reference MDEQ-Vision/lib/models/mdeq.py:MDEQSegNet; docs/thesis.md §3).
# With the thesis's downsample_times=2 the logits are at 1/4 of the input resolution; the task
# upsamples them to the label size. Defaults are the thesis's Cityscapes MDEQ-small
# (experiments/cityscapes/seg_mdeq_SMALL.yaml): BN momentum 0.01, dropout 0.05, a 1x1 final conv.


class SegmentationHead(nn.Module):
    """Equilibrium streams -> per-pixel logits at the resolution of the first stream."""

    def __init__(
        self,
        channels: Sequence[int],
        num_classes: int,
        final_conv_kernel: int = 1,
        bn_momentum: float = 0.01,
    ) -> None:
        super().__init__()
        if final_conv_kernel not in (1, 3):
            raise ValueError(f"final_conv_kernel must be 1 or 3, got {final_conv_kernel}")
        width = sum(channels)
        self.mix = nn.Sequential(
            nn.Conv2d(width, width, 1),
            nn.BatchNorm2d(width, momentum=bn_momentum),
            nn.ReLU(),
        )
        self.classifier = nn.Conv2d(
            width, num_classes, final_conv_kernel, padding=final_conv_kernel // 2
        )

    def forward(self, streams: Sequence[Tensor]) -> Tensor:
        size = streams[0].shape[-2:]
        # align_corners=False (the torchvision convention); the reference uses True. Either is
        # learned around; neither changes what the head can represent.
        up = [streams[0]] + [
            F.interpolate(z, size=size, mode="bilinear", align_corners=False) for z in streams[1:]
        ]
        return self.classifier(self.mix(torch.cat(up, dim=1)))


class MDEQSegmenter(MDEQModel):
    """MDEQ semantic segmentation: ``forward(x) -> ModelOutput(logits, stats)``.

    ``logits`` has shape ``(B, num_classes, H / 2**d, W / 2**d)`` (``d = downsample_times``,
    sizes rounded up): the resolution of the highest stream. ``stats`` is the
    :class:`~deq_lightning.deq.DEQStats` of the backbone's equilibrium solve.
    """

    def __init__(
        self,
        num_classes: int = 19,
        final_conv_kernel: int = 1,
        dropout: float = 0.05,
        downsample_times: int = 2,
        post_gn_affine: bool = True,
        bn_momentum: float = 0.01,
        deq: dict | None = None,
        **backbone: Any,
    ) -> None:
        if num_classes < 2:
            raise ValueError(f"model.num_classes must be >= 2, got {num_classes}")

        def head(channels: list[int]) -> SegmentationHead:
            return SegmentationHead(channels, num_classes, final_conv_kernel, bn_momentum)

        super().__init__(
            head,
            deq,
            dropout=dropout,
            downsample_times=downsample_times,
            post_gn_affine=post_gn_affine,
            bn_momentum=bn_momentum,
            **backbone,
        )
        self.num_classes = num_classes
        self.downsample_times = downsample_times


__all__ = [
    "ClassificationHead",
    "MDEQBackbone",
    "MDEQClassifier",
    "MDEQModel",
    "MDEQSegmenter",
    "MultiscaleFusion",
    "MultiscaleLayer",
    "ResidualBlock",
    "SegmentationHead",
]
