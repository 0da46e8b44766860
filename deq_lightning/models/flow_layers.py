"""What DEQ-Flow and its explicit twin RAFT share: input padding, the x8 convex upsampling, the
pixel grid, and :class:`FlowModel`, the frame-pair front end (input scaling and checks, the two
encoders and the correlation pyramid), the warm-start checks, the frozen batch norm and the
recomputation of parts in backward (``recompute``).

One copy, so the two flow models read their inputs and warm starts identically and the flow task
can swap one for the other.
"""

from __future__ import annotations

import contextvars
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NamedTuple, Self

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchvision.models.optical_flow.raft import CorrBlock

from deq_lightning.models.contract import ModelOutput

UPSAMPLE = 8  # both encoders downsample by 8
# What ``recompute`` may name: the two encoders, and the update steps that carry gradients (a
# DEQ's phantom or implicit steps, RAFT's iterations).
RECOMPUTE_PARTS = ("encoders", "update")

# ----------------------------------------------------------------------------------------------
# Shapes: padding to a multiple of 8, convex upsampling
# ----------------------------------------------------------------------------------------------


class InputPadder:
    """Replicate-pad images to a multiple of 8 and crop predictions back.

    ``mode="sintel"`` splits the padding evenly on all sides; ``"kitti"`` pads the height at the
    bottom only (deq-flow ``InputPadder``; KITTI frames are 370-376 px high).
    """

    def __init__(self, size: Sequence[int], mode: str = "sintel", multiple: int = UPSAMPLE):
        if mode not in ("sintel", "kitti"):
            raise ValueError(f"pad mode must be 'sintel' or 'kitti', got {mode!r}")
        h, w = size[-2:]
        ph, pw = -h % multiple, -w % multiple
        top = 0 if mode == "kitti" else ph // 2
        self.pads = (pw // 2, pw - pw // 2, top, ph - top)  # left, right, top, bottom

    def pad(self, x: Tensor) -> Tensor:
        return F.pad(x, self.pads, mode="replicate") if any(self.pads) else x

    def unpad(self, x: Tensor) -> Tensor:
        left, right, top, bottom = self.pads
        h, w = x.shape[-2:]
        return x[..., top : h - bottom, left : w - right]


def convex_upsample(flow: Tensor, mask: Tensor, factor: int = UPSAMPLE) -> Tensor:
    """Upsample ``(B, 2, h, w)`` flow to ``(B, 2, h*f, w*f)``.

    Each fine pixel is a convex combination (softmax weights from ``mask``, ``(B, 9*f*f, h, w)``)
    of the 3x3 coarse neighbours of its coarse pixel; flow vectors are scaled by ``f``.
    """
    b, _, h, w = flow.shape
    weights = torch.softmax(mask.view(b, 1, 9, factor, factor, h, w).float(), dim=2)
    neighbours = F.unfold(factor * flow.float(), kernel_size=3, padding=1)
    neighbours = neighbours.view(b, 2, 9, 1, 1, h, w)
    up = (weights * neighbours).sum(dim=2)  # (b, 2, f, f, h, w)
    return up.permute(0, 1, 4, 2, 5, 3).reshape(b, 2, h * factor, w * factor)


def pixel_grid(h: int, w: int, device: torch.device) -> Tensor:
    """``(1, 2, h, w)`` pixel coordinates, x first (the order CorrBlock indexes with)."""
    ys, xs = torch.meshgrid(
        torch.arange(h, device=device, dtype=torch.float32),
        torch.arange(w, device=device, dtype=torch.float32),
        indexing="ij",
    )
    return torch.stack([xs, ys])[None]


# ----------------------------------------------------------------------------------------------
# Recomputation in backward (activation checkpointing)
# ----------------------------------------------------------------------------------------------


def recompute_parts(parts: Sequence[str] | None) -> frozenset[str]:
    """The checked set of parts a model recomputes in backward (``None``: none)."""
    if isinstance(parts, str):
        parts = [parts]
    chosen = frozenset(parts or ())
    unknown = sorted(chosen - set(RECOMPUTE_PARTS))
    if unknown:
        raise ValueError(
            f"unknown recompute part(s) {unknown}; choose from {list(RECOMPUTE_PARTS)}, "
            "e.g. model.recompute=[encoders,update]"
        )
    return chosen


@contextmanager
def held_running_stats(module: nn.Module) -> Iterator[None]:
    """Normalisation layers in ``module`` that keep running statistics (batch norm, instance
    norm with ``track_running_stats``) normalise as usual but leave those statistics and their
    batch count as they were: a forward run again in backward must not count its batch twice."""
    norms = [
        m
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._NormBase) and m.training and m.track_running_stats
    ]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0  # running = 1 * running + 0 * batch, exactly
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved, strict=True):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


def _per_sample(module: nn.Module) -> bool:
    """Whether ``module`` treats each sample on its own: no batch norm (it mixes the samples)
    and no running statistics (they count the batches)."""
    return not any(
        isinstance(m, nn.modules.batchnorm._BatchNorm)
        or (isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats)
        for m in module.modules()
    )


def recomputed(fn: Callable[..., Any], module: nn.Module, *inputs: Any) -> Any:
    """``fn(*inputs)`` without keeping its activations: backward runs it again (torch's
    non-reentrant checkpointing). ``module`` holds what ``fn`` runs; its batch norm counts the
    first run only. The re-run sees the context of the first (a DEQ's per-forward scope and
    batch index), so it reuses that forward's weight-norm weights and dropout masks."""
    runs = 0
    context = contextvars.copy_context()

    def run(*args: Any) -> Any:
        nonlocal runs
        runs += 1
        if runs == 1:
            return fn(*args)
        with held_running_stats(module):
            return context.copy().run(fn, *args)

    return checkpoint(run, *inputs, use_reentrant=False)


class EncodedPair(NamedTuple):
    """A frame pair after the front end, all at 1/8 of the padded size: the ``padder`` (to crop
    predictions back), the correlation pyramid ``corr`` and the context encoder's output for
    frame 1."""

    padder: InputPadder
    corr: CorrBlock
    context: Tensor


class FlowModel(nn.Module):
    """A RAFT-style flow model's interface and front end; subclasses define :meth:`estimate`,
    the update loop or solve.

    Subclasses set ``feature_encoder``, ``context_encoder``, ``pixel_max``, ``corr_levels``,
    ``corr_radius``, ``hidden_dim`` and ``bn_frozen`` in ``__init__``, and may set
    ``recompute`` (see :meth:`_run`).
    """

    feature_encoder: nn.Module
    context_encoder: nn.Module
    pixel_max: float
    corr_levels: int
    corr_radius: int
    hidden_dim: int
    bn_frozen: bool
    recompute: frozenset[str] = frozenset()

    # -- batch norm ------------------------------------------------------------------------------

    def freeze_bn(self, frozen: bool = True) -> Self:
        """Keep batch-norm statistics fixed (the thesis and RAFT do after the Chairs stage).

        The flag survives ``train()`` calls, which Lightning makes at every epoch; the affine
        parameters still train, as in the thesis.
        """
        self.bn_frozen = frozen
        return self.train(self.training)

    def train(self, mode: bool = True) -> Self:
        super().train(mode)
        if self.bn_frozen:
            for m in self.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    # -- forward ---------------------------------------------------------------------------------

    def forward(
        self,
        image1: Tensor,
        image2: Tensor,
        flow_init: Tensor | None = None,
        state_init: Sequence[Tensor] | None = None,
        pad_mode: str = "sintel",
    ) -> ModelOutput:
        """Frames ``(B, 3, H, W)`` in ``[0, pixel_max]`` -> ``ModelOutput(out, stats)``.

        ``flow_init`` or ``state_init`` (an earlier ``out["state"]``) warm-starts the estimate;
        ``pad_mode`` is :class:`InputPadder`'s.
        """
        return self.estimate(self._encode(image1, image2, pad_mode), flow_init, state_init)

    def estimate(
        self, pair: EncodedPair, flow_init: Tensor | None, state_init: Sequence[Tensor] | None
    ) -> ModelOutput:
        """The flow of an encoded pair: the model proper, which each subclass defines."""
        raise NotImplementedError(f"{type(self).__name__} must define estimate()")

    def _encode(self, image1: Tensor, image2: Tensor, pad_mode: str) -> EncodedPair:
        """Images in ``[0, pixel_max]`` -> the pair the model refines (see :class:`EncodedPair`)."""
        self._check_images(image1, image2)
        padder = InputPadder(image1.shape, pad_mode)
        x1 = padder.pad(2.0 * image1 / self.pixel_max - 1.0)  # [-1, 1] as in the thesis and RAFT
        x2 = padder.pad(2.0 * image2 / self.pixel_max - 1.0)
        self._check_size(x1)
        fmap1, fmap2 = self._features(x1, x2)
        corr = CorrBlock(num_levels=self.corr_levels, radius=self.corr_radius)
        with torch.autocast(x1.device.type, enabled=False):  # correlation in float32
            corr.build_pyramid(fmap1.float(), fmap2.float())
        context = self.context_encoder
        return EncodedPair(padder, corr, self._run("encoders", context, context, x1))

    def _features(self, x1: Tensor, x2: Tensor) -> tuple[Tensor, Tensor]:
        """Both frames' correlation features: one batch, or one frame at a time when recomputed
        and no layer mixes the frames (batch norm) or counts them (running statistics): then
        the result is the same and backward holds one frame's activations at a time, not two."""
        encoder = self.feature_encoder
        if self._recomputing("encoders") and _per_sample(encoder):
            return recomputed(encoder, encoder, x1), recomputed(encoder, encoder, x2)
        return self._run("encoders", encoder, encoder, torch.cat([x1, x2])).chunk(2)

    def _recomputing(self, part: str) -> bool:
        return part in self.recompute and self.training and torch.is_grad_enabled()

    def _run(self, part: str, module: nn.Module, fn: Callable[..., Any], *inputs: Any) -> Any:
        """``fn(*inputs)``, which runs ``module``; recomputed in backward instead of keeping its
        activations when ``part`` is in ``recompute`` and a training graph is being recorded.
        The gradients are the same; the step costs one more forward of that part."""
        if self._recomputing(part):
            return recomputed(fn, module, *inputs)
        return fn(*inputs)

    def _warm_start(
        self,
        shape: Sequence[int],
        flow_init: Tensor | None,
        state_init: Sequence[Tensor] | None,
    ) -> tuple[Tensor | None, Tensor | None]:
        """The given start ``(hidden, flow)`` for a ``(b, _, h, w)`` context, checked and detached:
        both from ``state_init``, the flow alone from ``flow_init``, or ``(None, None)``."""
        if flow_init is not None and state_init is not None:
            raise ValueError(
                "pass flow_init or state_init, not both: state_init already holds the flow"
            )
        b, _, h, w = shape
        hidden_shape, flow_shape = (b, self.hidden_dim, h, w), (b, 2, h, w)
        if state_init is not None:
            if len(state_init) != 2:
                raise ValueError("state_init must be the (hidden, flow) pair of out['state']")
            hidden, flow = state_init
            self._check_shape("state_init hidden", hidden, hidden_shape)
            self._check_shape("state_init flow", flow, flow_shape)
            return hidden.detach(), flow.detach().float()
        if flow_init is not None:
            self._check_shape("flow_init", flow_init, flow_shape)
            return None, flow_init.detach().float()
        return None, None

    @staticmethod
    def _check_shape(name: str, t: Tensor, shape: tuple[int, ...]) -> None:
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but this input needs {shape} "
                "(1/8 of the padded image size); pass the state of a pair of the same size"
            )

    def _check_images(self, image1: Tensor, image2: Tensor) -> None:
        if image1.dim() != 4 or image1.shape[1] != 3 or image1.shape != image2.shape:
            raise ValueError(
                f"{type(self).__name__} expects two RGB batches of the same shape (B, 3, H, W); "
                f"got {tuple(image1.shape)} and {tuple(image2.shape)}"
            )

    def _check_size(self, x: Tensor) -> None:
        need = UPSAMPLE * 2**self.corr_levels
        if min(x.shape[-2:]) < need:
            raise ValueError(
                f"{type(self).__name__} with corr_levels={self.corr_levels} needs images of at "
                f"least {need}x{need} pixels (the coarsest correlation level must keep 2 pixels), "
                f"got {tuple(x.shape[-2:])}; use larger crops or fewer corr_levels"
            )


__all__ = [
    "RECOMPUTE_PARTS",
    "UPSAMPLE",
    "EncodedPair",
    "FlowModel",
    "InputPadder",
    "convex_upsample",
    "held_running_stats",
    "pixel_grid",
    "recompute_parts",
    "recomputed",
]
