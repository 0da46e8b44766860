"""RAFT (Teed & Deng, ECCV 2020): the explicit, layered twin of DEQ-Flow.

DEQ-Flow solves for the fixed point of RAFT's update operator; RAFT itself applies the operator a
fixed number of times and backpropagates through every application. This model is that explicit
counterpart, so ``model=raft_*`` trains it with the same :class:`~deq_lightning.tasks.flow.FlowTask`
(data, loss, metrics, prediction) as ``model=deq_flow_*``:

* the modules are torchvision's RAFT (``torchvision.models.optical_flow.raft_small`` /
  ``raft_large``, randomly initialised, ``weights=None``): a feature encoder for both frames
  (instance norm), a context encoder for frame 1 whose output is split into the initial hidden
  state (``tanh``) and the context (``relu``), an all-pairs correlation pyramid, the update block
  (motion encoder, ConvGRU, flow head) and, for ``large`` only, the convex-upsampling mask
  predictor (``small`` upsamples bilinearly, as RAFT-S does);
* torchvision's ``RAFT.forward`` has no warm start and returns every iteration, so this class
  drives those modules in its own loop (the same computation as ``RAFT.forward``, which a test
  checks): each iteration looks the correlation up around ``pixel + flow``, updates the hidden
  state and adds the predicted increment to the flow. The flow entering an iteration is detached
  (RAFT's choice); gradients reach earlier iterations through the hidden state;
* training returns every iteration's full-resolution flow: the task's
  :func:`~deq_lightning.models.deq_flow.fixed_point_correction_loss` over them, with gamma 0.8, is
  RAFT's sequence loss. Evaluation runs ``eval_iters`` iterations and returns the last flow.

Settings (RAFT paper and its ``train.py`` / ``evaluate.py``; torchvision's builders): RAFT trains
with 12 iterations and evaluates with 24 (Chairs, KITTI) or 32 (Sintel); ``large`` has a 4-level
pyramid of radius 4 (5.26M parameters in torchvision, "5.3M" in the paper), ``small`` 4 levels of
radius 3 (0.99M, "1.0M"). Padding to a multiple of 8, the [-1, 1] input scaling and the checks
are DEQ-Flow's: both models share :class:`~deq_lightning.models.flow_layers.FlowModel`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.optical_flow import raft_large, raft_small
from torchvision.models.optical_flow.raft import CorrBlock

from deq_lightning.models.contract import ModelOutput
from deq_lightning.models.flow_layers import (
    UPSAMPLE,
    EncodedPair,
    FlowModel,
    convex_upsample,
    pixel_grid,
    recompute_parts,
)

BUILDERS = {"small": raft_small, "large": raft_large}
# (levels, radius) of each builder's correlation pyramid, the defaults of corr_levels/corr_radius.
CORR_DEFAULTS = {"small": (4, 3), "large": (4, 4)}


class RAFTFlow(FlowModel):
    """RAFT with DEQFlow's interface: ``forward(image1, image2) -> ModelOutput(out, None)``.

    Images are ``(B, 3, H, W)`` with values in ``[0, pixel_max]``; any H, W work (replicate-padded
    to a multiple of 8 inside). ``out`` holds

    * ``flow_preds``: full-resolution flows ``(B, 2, H, W)``, one per iteration in training
      (``num_iters`` of them, for the sequence loss), only the final one in eval;
    * ``flow``: the last of them, the prediction;
    * ``flow_low``: the final flow at 1/8 of the padded size;
    * ``state``: the (detached) final ``(hidden, flow_low)``.

    ``flow_init`` (1/8 of the padded size) starts the flow from a previous estimate, RAFT's warm
    start for Sintel sequences. ``state_init`` (an ``out["state"]``) also replaces the initial
    hidden state, which otherwise comes from the context encoder; pass one or the other.

    ``size`` picks torchvision's configuration, ``small`` or ``large``; ``corr_levels`` and
    ``corr_radius`` override its correlation pyramid (``None``: the configuration's own). A
    pyramid of ``corr_levels`` levels needs inputs of at least ``8 * 2**corr_levels`` pixels per
    side (use 3 levels for 64-px crops). ``n_states`` is DEQ-Flow's number of supervised solver
    states: it is accepted so that experiments written for DEQ-Flow (``experiment=flow_tiny``
    sets ``model.n_states``) compose with ``model=raft_*``, and it is ignored: RAFT supervises
    every one of its ``num_iters`` iterations. ``recompute`` (``encoders``, ``update``) runs
    those parts again in backward instead of storing their activations, as DEQ-Flow's does.
    """

    def __init__(
        self,
        size: str = "large",
        num_iters: int = 12,
        eval_iters: int = 24,
        corr_levels: int | None = None,
        corr_radius: int | None = None,
        pixel_max: float = 255.0,
        n_states: int | None = None,
        recompute: Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if size not in BUILDERS:
            raise ValueError(f"unknown RAFT size {size!r}; choose one of {sorted(BUILDERS)}")
        for name, value in (("num_iters", num_iters), ("eval_iters", eval_iters)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        for name, value in (("corr_levels", corr_levels), ("corr_radius", corr_radius)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or null for the size's), got {value}")
        if pixel_max <= 0:
            raise ValueError(f"pixel_max must be > 0, got {pixel_max}")
        if n_states is not None and n_states < 1:
            raise ValueError(f"n_states must be >= 1, got {n_states}")
        self.size = size
        self.num_iters, self.eval_iters = num_iters, eval_iters
        self.pixel_max = float(pixel_max)
        self.bn_frozen = False
        self.recompute = recompute_parts(recompute)

        # torchvision's builder with the pyramid overridden: it sizes the motion encoder's input
        # from the corr block it is given. Only the modules are kept; forward drives them.
        default_levels, default_radius = CORR_DEFAULTS[size]
        self.corr_levels = corr_levels or default_levels
        self.corr_radius = corr_radius or default_radius
        raft = BUILDERS[size](
            weights=None,
            corr_block=CorrBlock(num_levels=self.corr_levels, radius=self.corr_radius),
        )
        self.feature_encoder = raft.feature_encoder
        self.context_encoder = raft.context_encoder
        self.update_block = raft.update_block
        self.mask_predictor = raft.mask_predictor  # None for small: bilinear upsampling
        self.hidden_dim = self.update_block.hidden_state_size
        self.context_dim = self.context_encoder.output_dim - self.hidden_dim

    # -- estimate --------------------------------------------------------------------------------

    def estimate(
        self, pair: EncodedPair, flow_init: Tensor | None, state_init: Sequence[Tensor] | None
    ) -> ModelOutput:
        padder, corr, encoded = pair
        hidden, context = encoded.split([self.hidden_dim, self.context_dim], 1)
        hidden, context = torch.tanh(hidden), torch.relu(context)
        h, w = context.shape[-2:]
        grid = pixel_grid(h, w, context.device)
        hidden, flow = self._initial_state(hidden, flow_init, state_init)

        n_iters = self.num_iters if self.training else self.eval_iters

        def update(hidden: Tensor, flow: Tensor, context: Tensor) -> tuple[Tensor, Tensor]:
            corr_features = corr.index_pyramid(grid + flow)
            return self.update_block(hidden, context, corr_features, flow)

        flow_preds = []
        for i in range(n_iters):
            flow = flow.detach()  # RAFT: no gradient through the lookup coordinates
            hidden, delta = self._run("update", self.update_block, update, hidden, flow, context)
            flow = flow + delta
            if self.training or i == n_iters - 1:
                flow_preds.append(padder.unpad(self._upsample(flow, hidden)))
        out = {
            "flow_preds": flow_preds,
            "flow": flow_preds[-1],
            "flow_low": flow,
            "state": (hidden.detach().float(), flow.detach().float()),
        }
        return ModelOutput(out, None)

    def _upsample(self, flow: Tensor, hidden: Tensor) -> Tensor:
        """x8: convex combination with predicted weights (large), bilinear (small, as RAFT-S)."""
        if self.mask_predictor is not None:
            return convex_upsample(flow, self.mask_predictor(hidden))
        h, w = flow.shape[-2:]
        size = (UPSAMPLE * h, UPSAMPLE * w)
        return UPSAMPLE * F.interpolate(flow.float(), size, mode="bilinear", align_corners=True)

    def _initial_state(
        self, hidden: Tensor, flow_init: Tensor | None, state_init: Sequence[Tensor] | None
    ) -> tuple[Tensor, Tensor]:
        """``(hidden, flow)`` before the first iteration: the context encoder's hidden state and
        zero flow, unless ``flow_init`` or ``state_init`` gives them."""
        state_hidden, flow = self._warm_start(hidden.shape, flow_init, state_init)
        if state_hidden is not None:
            hidden = state_hidden.to(hidden.dtype)
        if flow is None:
            b, _, h, w = hidden.shape
            flow = torch.zeros(b, 2, h, w, device=hidden.device)
        return hidden, flow


__all__ = ["CORR_DEFAULTS", "RAFTFlow"]
