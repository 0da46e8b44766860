"""DEQ-Flow (Bai, Geng, Savani & Kolter, CVPR 2022; thesis ch. 7): RAFT's update as a DEQ layer.

RAFT refines optical flow with a fixed number of recurrent updates. DEQ-Flow keeps the update
operator and solves for its fixed point instead:

* two encoders read the frames at 1/8 resolution: a *feature* encoder (instance norm) for both
  frames, whose all-pairs correlation volume is pooled into a pyramid (4 levels, radius 4), and a
  *context* encoder (batch norm, then ReLU; no norm at size small) for frame 1, the injection;
* the state is z = (h, flow): a GRU hidden state and the flow, both at 1/8 resolution;
* f(h, flow) looks the correlation up around ``pixel + flow``, encodes it with the flow (motion
  encoder), updates h with a separable (1x5 then 5x1) ConvGRU and adds the flow head's output to
  the flow. The flow entering f is detached unless ``all_grad`` (as in the thesis: gradients
  then reach the flow only through the current step's update);
* the equilibrium flow is upsampled x8 by a convex combination of each coarse pixel's 3x3
  neighbours, with weights predicted from h.

Training supervises ``n_states`` states along the solver trajectory (*sparse fixed-point
correction*, :func:`fixed_point_correction_loss`); phantom and implicit gradients are the DEQ
core's backward modes. The building blocks are torchvision's RAFT modules, reused by import;
the front end (padding, encoders, correlation, warm-start checks) is :mod:`flow_layers`'s, shared
with RAFT.

Architecture facts (from locuslab/deq-flow ``code.v.2.0/core/deq_flow.py``, ``update.py``,
``main.py``, ``evaluate.py``; see docs/thesis.md §6): the hidden state starts at zero, the flow
at zero; the context encoder outputs ``context_dim`` channels; the flow head is twice the motion
width (v2). Parameter counts: B (hidden 128) 5.243M and H (256) 13.395M, as deq-flow prints
them; L (192) 8.67M (v1, whose flow head was capped at 256, had 8.4M).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.interpolate import griddata
from torch import Tensor, nn
from torchvision.models.optical_flow.raft import (
    BottleneckBlock,
    CorrBlock,
    FeatureEncoder,
    FlowHead,
    MaskPredictor,
    MotionEncoder,
    RecurrentBlock,
    ResidualBlock,
    UpdateBlock,
)

from deq_lightning.deq import DEQ, apply_weight_norm
from deq_lightning.metrics.flow import flow_length
from deq_lightning.models.contract import ModelOutput
from deq_lightning.models.flow_layers import (
    UPSAMPLE,
    EncodedPair,
    FlowModel,
    convex_upsample,
    pixel_grid,
    recompute_parts,
)

MAX_FLOW = 400.0  # pixels with |gt| >= 400 are left out of the loss (deq-flow main.py)


@dataclass(frozen=True)
class FlowSize:
    """Widths of one model size."""

    encoder: tuple[int, int, int, int]  # encoder stages: stem (1/2), 1/2, 1/4, 1/8
    feature_dim: int  # feature-encoder output (the correlation features)
    hidden_dim: int  # GRU hidden state
    corr_layers: tuple[int, ...]  # motion encoder, correlation branch
    flow_layers: tuple[int, int]  # motion encoder, flow branch
    motion_dim: int  # motion encoder output
    flow_head_dim: int
    mask_dim: int  # hidden width of the upsampling-mask predictor
    context_dim: int | None = None  # context (injection) width; None: hidden_dim
    bottleneck: bool = False  # encoders of bottleneck blocks (RAFT-small's) instead of residual
    gru_kernel: int | None = None  # one square ConvGRU kernel (RAFT-small: 3); None: 1x5 then 5x1
    context_norm: str = "batch"  # the context encoder's normalisation, a key of CONTEXT_NORMS


# B/L/H: deq-flow code.v.2.0 (default, --large, --huge). "tiny" is ours, for CPU runs: the
# motion widths of deq-flow's --tiny with encoders at half width. "tiny_wide" is tiny with an
# update block about as wide as torchvision's RAFT-small (correlation branch 96 then 64, flow
# branch 64/32, motion output 80, flow head 128; RAFT-small: 96, 64/32, 82, 128): 0.94M
# parameters at 3 levels against RAFT-small's 0.99M. The update block runs at 1/8 resolution,
# so the width costs little time (reports/flow/update_width/ measures what it buys). "small" is
# torchvision's raft_small as a DEQ (bottleneck encoders 32-32-64-96 with 128-d features, hidden
# 96, context 64, a 3x3 ConvGRU, the same motion encoder and flow head, a context encoder
# without normalisation), plus the convex upsampling RAFT-small leaves out: the DEQ of matching
# size beside RAFT-small.
SIZES: dict[str, FlowSize] = {
    "tiny": FlowSize((32, 32, 48, 64), 64, 32, (64, 48), (32, 16), 32, 64, 64),
    "tiny_wide": FlowSize((32, 32, 48, 64), 64, 32, (96, 64), (64, 32), 80, 128, 64),
    "small": FlowSize(
        (32, 32, 64, 96),
        128,
        96,
        (96,),
        (64, 32),
        82,
        128,
        mask_dim=64,
        context_dim=64,
        bottleneck=True,
        gru_kernel=3,
        context_norm="none",
    ),
    "B": FlowSize((64, 64, 96, 128), 256, 128, (256, 192), (128, 64), 128, 256, 256),
    "L": FlowSize((64, 64, 96, 128), 256, 192, (384, 288), (192, 96), 192, 384, 256),
    "H": FlowSize((64, 64, 96, 128), 256, 256, (512, 384), (256, 128), 256, 512, 256),
}


# The context encoder's normalisation: batch norm in RAFT and DEQ-Flow B/L/H, none in RAFT-small
# (torchvision's FeatureEncoder takes ``None`` for none: its convolutions then keep their bias).
CONTEXT_NORMS: dict[str, type[nn.Module] | None] = {
    "batch": nn.BatchNorm2d,
    "instance": nn.InstanceNorm2d,
    "none": None,
}


# ----------------------------------------------------------------------------------------------
# Batch compaction
# ----------------------------------------------------------------------------------------------


class RowsOf:
    """The correlation pyramid and context of some batch rows, for batch compaction.

    The solver passes the same ``index`` tensor until more samples converge, so the selected
    pyramid (a copy of those rows' correlation volumes) is rebuilt only when the rows change.
    """

    def __init__(self, corr: CorrBlock, context: Tensor) -> None:
        self.corr, self.context = corr, context
        self._index: Tensor | None = None
        self._rows: tuple[CorrBlock, Tensor] = (corr, context)

    def select(self, index: Tensor | None) -> tuple[CorrBlock, Tensor]:
        if index is None:
            return self.corr, self.context
        if index is not self._index:
            b = self.context.shape[0]
            sub = CorrBlock(num_levels=self.corr.num_levels, radius=self.corr.radius)
            # Each level is (batch * h * w, 1, h_l, w_l): select whole samples.
            sub.corr_pyramid = [
                lvl.view(b, -1, *lvl.shape[1:])[index].flatten(0, 1)
                for lvl in self.corr.corr_pyramid
            ]
            self._index, self._rows = index, (sub, self.context[index])
        return self._rows


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------


class DEQFlow(FlowModel):
    """DEQ-Flow: ``forward(image1, image2) -> ModelOutput(out, stats)``.

    Images are ``(B, 3, H, W)`` with values in ``[0, pixel_max]`` (255 for the datasets here);
    any H, W work (replicate-padded to a multiple of 8 inside). ``out`` holds

    * ``flow_preds``: full-resolution flows ``(B, 2, H, W)`` at ``n_states`` states of the
      solve in training (for the correction loss), only the equilibrium in eval;
    * ``flow``: the last of them, the prediction;
    * ``flow_low``: the equilibrium flow at 1/8 of the padded size;
    * ``state``: the (detached) fixed point ``(h, flow_low)``. Pass it as ``state_init`` for the
      next frame pair of a sequence (warm start); ``flow_init`` sets only the flow part.

    ``corr_levels`` pyramid levels need inputs of at least ``8 * 2**corr_levels`` pixels per
    side (128 for 4 levels; use 3 levels for 64-px crops).

    ``hidden_init`` is where the solve starts its hidden state: ``zero`` (the thesis) or
    ``context``, RAFT's start: the context encoder outputs ``hidden_dim`` more channels whose
    ``tanh`` is the initial hidden state (a warm ``state_init`` replaces either).
    ``context_norm`` (a key of :data:`CONTEXT_NORMS`; ``None``: the size's) normalises the
    context encoder. ``recompute`` (``encoders``, ``update``: :data:`RECOMPUTE_PARTS`) runs
    those parts again in backward instead of storing their activations in training.
    """

    # The weight-tied module f applies (task.compile=true compiles it; see tasks/base.py).
    equilibrium_cell = "update_block"

    def __init__(
        self,
        size: str = "B",
        hidden_dim: int | None = None,
        context_dim: int | None = None,
        corr_levels: int = 4,
        corr_radius: int = 4,
        n_states: int = 1,
        all_grad: bool = False,
        weight_norm: bool = True,
        pixel_max: float = 255.0,
        hidden_init: str = "zero",
        context_norm: str | None = None,
        recompute: Sequence[str] | None = None,
        deq: dict | None = None,
    ) -> None:
        super().__init__()
        if hidden_init not in ("zero", "context"):
            raise ValueError(f"hidden_init must be 'zero' or 'context', got {hidden_init!r}")
        if size not in SIZES:
            raise ValueError(f"unknown DEQ-Flow size {size!r}; choose one of {sorted(SIZES)}")
        if n_states < 1:
            raise ValueError(f"n_states must be >= 1, got {n_states}")
        spec = SIZES[size]
        context_norm = context_norm or spec.context_norm
        if context_norm not in CONTEXT_NORMS:
            raise ValueError(
                f"unknown context_norm {context_norm!r}; choose one of {sorted(CONTEXT_NORMS)}"
            )
        self.size = size
        self.hidden_dim = hidden_dim or spec.hidden_dim
        self.context_dim = context_dim or spec.context_dim or self.hidden_dim
        self.corr_levels, self.corr_radius = corr_levels, corr_radius
        self.n_states = n_states
        self.all_grad = all_grad
        self.pixel_max = float(pixel_max)
        self.hidden_init = hidden_init
        self.bn_frozen = False
        self.recompute = recompute_parts(recompute)
        init_dim = self.hidden_dim if hidden_init == "context" else 0

        block = BottleneckBlock if spec.bottleneck else ResidualBlock
        self.feature_encoder = FeatureEncoder(
            block=block, layers=(*spec.encoder, spec.feature_dim), norm_layer=nn.InstanceNorm2d
        )
        self.context_encoder = FeatureEncoder(
            block=block,
            layers=(*spec.encoder, self.context_dim + init_dim),
            norm_layer=CONTEXT_NORMS[context_norm],
        )
        k = spec.gru_kernel
        gru = {} if k is None else {"kernel_size": (k,), "padding": (k // 2,)}
        self.update_block = UpdateBlock(
            motion_encoder=MotionEncoder(
                in_channels_corr=corr_levels * (2 * corr_radius + 1) ** 2,
                corr_layers=spec.corr_layers,
                flow_layers=spec.flow_layers,
                out_channels=spec.motion_dim,
            ),
            recurrent_block=RecurrentBlock(
                input_size=spec.motion_dim + self.context_dim, hidden_size=self.hidden_dim, **gru
            ),
            flow_head=FlowHead(in_channels=self.hidden_dim, hidden_size=spec.flow_head_dim),
        )
        # The mask logits are scaled by 0.25, as in RAFT (it damps this branch's gradients).
        self.mask_predictor = MaskPredictor(
            in_channels=self.hidden_dim, hidden_size=spec.mask_dim, multiplier=0.25
        )
        if weight_norm:
            apply_weight_norm(self.update_block)
        self.deq = DEQ(**(deq or {}))
        self.deq.residual_measure = flow_update_px

    # -- estimate --------------------------------------------------------------------------------

    def estimate(
        self, pair: EncodedPair, flow_init: Tensor | None, state_init: Sequence[Tensor] | None
    ) -> ModelOutput:
        padder, corr, context = pair
        hidden0 = None
        if self.hidden_init == "context":  # RAFT: tanh of the extra channels
            hidden0, context = context.split([self.hidden_dim, self.context_dim], 1)
            hidden0 = torch.tanh(hidden0)
        context = torch.relu(context)
        grid = pixel_grid(*context.shape[-2:], context.device)

        rows = RowsOf(corr, context)

        def f(z: Sequence[Tensor], index: Tensor | None = None) -> tuple[Tensor, Tensor]:
            # ``index``: batch compaction (the DEQ solves only the rows still unconverged)
            hidden, flow = z
            if not self.all_grad:
                flow = flow.detach()
            corr_i, context_i = rows.select(index)

            def update(hidden: Tensor, flow: Tensor, context_i: Tensor) -> tuple[Tensor, Tensor]:
                corr_features = corr_i.index_pyramid(grid + flow)
                return self.update_block(hidden, context_i, corr_features, flow)

            hidden, delta = self._run("update", self.update_block, update, hidden, flow, context_i)
            return hidden, flow + delta

        z0 = self._initial_state(context, flow_init, state_init, hidden0)
        n_states = self.n_states if self.training else 1
        states, stats = self.deq.trajectory(f, z0, n_states)
        flow_preds = [
            padder.unpad(convex_upsample(flow, self.mask_predictor(hidden)))
            for hidden, flow in states
        ]
        hidden, flow_low = states[-1]
        out = {
            "flow_preds": flow_preds,
            "flow": flow_preds[-1],
            "flow_low": flow_low,
            "state": (hidden.detach(), flow_low.detach()),
        }
        return ModelOutput(out, stats)

    def _initial_state(
        self,
        context: Tensor,
        flow_init: Tensor | None,
        state_init: Sequence[Tensor] | None,
        hidden0: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """Where the solve starts: ``state_init``, else ``hidden0`` (zeros if ``None``) with
        ``flow_init`` (zero flow if ``None``)."""
        hidden, flow = self._warm_start(context.shape, flow_init, state_init)
        b, _, h, w = context.shape
        hidden = hidden0 if hidden is None else hidden
        if hidden is None:
            hidden = torch.zeros(b, self.hidden_dim, h, w, device=context.device)
        if flow is None:
            flow = torch.zeros(b, 2, h, w, device=context.device)
        return hidden.float(), flow


# ----------------------------------------------------------------------------------------------
# Loss and warm start
# ----------------------------------------------------------------------------------------------


def fixed_point_correction_loss(
    flow_preds: Sequence[Tensor],
    flow_gt: Tensor,
    valid: Tensor | None = None,
    gamma: float = 0.8,
    max_flow: float = MAX_FLOW,
) -> Tensor:
    """Sparse fixed-point correction: ``sum_i gamma**(N-1-i) * mean(mask * |flow_i - gt|_1)``.

    ``flow_preds`` are the N states' flows (the last is the equilibrium, weight 1). ``mask``
    keeps pixels with ``valid >= 0.5`` and ``|gt| < max_flow``; the mean runs over all pixels
    and both channels, masked ones counting as zero (deq-flow ``main.py``). The thesis uses
    gamma 0.8, and 0.9 for Sintel and KITTI fine-tuning.
    """
    if not flow_preds:
        raise ValueError("fixed_point_correction_loss needs at least one flow prediction")
    mask = flow_length(flow_gt) < max_flow
    if valid is not None:
        mask = mask & (valid >= 0.5)
    mask = mask[:, None].to(flow_gt.dtype)
    n = len(flow_preds)
    return sum(
        gamma ** (n - 1 - i) * (mask * (pred - flow_gt).abs()).mean()
        for i, pred in enumerate(flow_preds)
    )


def flow_update_px(fz: Sequence[Tensor], z: Sequence[Tensor]) -> Tensor:
    """DEQ-Flow's residual term (``task.residual_loss_weight``): the mean absolute flow update
    ``f(z) - z`` at the equilibrium, in full-resolution pixels like the correction loss. A
    learned update that never quite stops drifts the flow a little at every iteration, so a
    larger evaluation budget makes the estimate worse; this term trains it to stop. The hidden
    state is left out: penalising its change as well (the relative residual) teaches the GRU to
    freeze, and the flow then collapses to zero (reports/flow/ablation.md)."""
    return UPSAMPLE * (fz[1].float() - z[1].detach().float()).abs().mean()


def forward_interpolate(flow: Tensor) -> Tensor:
    """Carry a ``(B, 2, h, w)`` flow to the next frame: move each vector to where it points and
    fill every pixel from the nearest moved vector (RAFT's warm start for Sintel sequences)."""
    out = []
    for sample in flow.detach().float().cpu().numpy():
        dx, dy = sample
        h, w = dx.shape
        x0, y0 = np.meshgrid(np.arange(w), np.arange(h))
        x1, y1 = (x0 + dx).ravel(), (y0 + dy).ravel()
        inside = (x1 > 0) & (x1 < w) & (y1 > 0) & (y1 < h)
        if not inside.any():
            out.append(np.zeros_like(sample))
            continue
        points = (x1[inside], y1[inside])
        out.append(
            np.stack(
                [griddata(points, d.ravel()[inside], (x0, y0), method="nearest") for d in (dx, dy)]
            )
        )
    return torch.from_numpy(np.stack(out).astype(np.float32)).to(flow.device)


__all__ = [
    "CONTEXT_NORMS",
    "SIZES",
    "DEQFlow",
    "FlowSize",
    "fixed_point_correction_loss",
    "flow_update_px",
    "forward_interpolate",
]
