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
follow :class:`~deq_lightning.models.deq_flow.DEQFlow`, whose helpers are reused by import.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.optical_flow import raft_large, raft_small
from torchvision.models.optical_flow.raft import CorrBlock

from deq_lightning.models.deq_flow import UPSAMPLE, InputPadder, convex_upsample, pixel_grid

BUILDERS = {"small": raft_small, "large": raft_large}
# (levels, radius) of each builder's correlation pyramid, the defaults of corr_levels/corr_radius.
CORR_DEFAULTS = {"small": (4, 3), "large": (4, 4)}


class RAFTFlow(nn.Module):
    """RAFT with DEQFlow's interface: ``forward(image1, image2) -> (out, None)``.

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
    every one of its ``num_iters`` iterations.
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

    # -- batch norm ------------------------------------------------------------------------------

    def freeze_bn(self, frozen: bool = True) -> RAFTFlow:
        """Keep batch-norm statistics fixed (RAFT does after its Chairs stage), as DEQFlow does.

        The flag survives ``train()`` calls; affine parameters still train. Only ``large`` has
        batch norm (its context encoder); ``small`` has none, so this changes nothing there.
        """
        self.bn_frozen = frozen
        return self.train(self.training)

    def train(self, mode: bool = True) -> RAFTFlow:
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
    ) -> tuple[dict, None]:
        self._check_images(image1, image2)
        padder = InputPadder(image1.shape, pad_mode)
        x1 = padder.pad(2.0 * image1 / self.pixel_max - 1.0)  # [-1, 1], as RAFT
        x2 = padder.pad(2.0 * image2 / self.pixel_max - 1.0)
        self._check_size(x1)

        fmap1, fmap2 = self.feature_encoder(torch.cat([x1, x2])).chunk(2)
        corr = CorrBlock(num_levels=self.corr_levels, radius=self.corr_radius)
        with torch.autocast(x1.device.type, enabled=False):  # correlation in float32
            corr.build_pyramid(fmap1.float(), fmap2.float())
        hidden, context = self.context_encoder(x1).split([self.hidden_dim, self.context_dim], 1)
        hidden, context = torch.tanh(hidden), torch.relu(context)
        h, w = context.shape[-2:]
        grid = pixel_grid(h, w, x1.device)
        hidden, flow = self._initial_state(hidden, flow_init, state_init)

        n_iters = self.num_iters if self.training else self.eval_iters
        flow_preds = []
        for i in range(n_iters):
            flow = flow.detach()  # RAFT: no gradient through the lookup coordinates
            corr_features = corr.index_pyramid(grid + flow)
            hidden, delta = self.update_block(hidden, context, corr_features, flow)
            flow = flow + delta
            if self.training or i == n_iters - 1:
                flow_preds.append(padder.unpad(self._upsample(flow, hidden)))
        out = {
            "flow_preds": flow_preds,
            "flow": flow_preds[-1],
            "flow_low": flow,
            "state": (hidden.detach().float(), flow.detach().float()),
        }
        return out, None

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
        if flow_init is not None and state_init is not None:
            raise ValueError(
                "pass flow_init or state_init, not both: state_init already holds the flow"
            )
        b, _, h, w = hidden.shape
        hidden_shape, flow_shape = (b, self.hidden_dim, h, w), (b, 2, h, w)
        if state_init is not None:
            if len(state_init) != 2:
                raise ValueError("state_init must be the (hidden, flow) pair of out['state']")
            state_hidden, state_flow = state_init
            self._check_shape("state_init hidden", state_hidden, hidden_shape)
            self._check_shape("state_init flow", state_flow, flow_shape)
            return state_hidden.detach().to(hidden.dtype), state_flow.detach().float()
        if flow_init is None:
            return hidden, torch.zeros(flow_shape, device=hidden.device)
        self._check_shape("flow_init", flow_init, flow_shape)
        return hidden, flow_init.detach().float()

    @staticmethod
    def _check_shape(name: str, t: Tensor, shape: tuple[int, ...]) -> None:
        if tuple(t.shape) != shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but this input needs {shape} "
                "(1/8 of the padded image size); pass the state of a pair of the same size"
            )

    @staticmethod
    def _check_images(image1: Tensor, image2: Tensor) -> None:
        if image1.dim() != 4 or image1.shape[1] != 3 or image1.shape != image2.shape:
            raise ValueError(
                "RAFTFlow expects two RGB batches of the same shape (B, 3, H, W); got "
                f"{tuple(image1.shape)} and {tuple(image2.shape)}"
            )

    def _check_size(self, x: Tensor) -> None:
        need = UPSAMPLE * 2**self.corr_levels
        if min(x.shape[-2:]) < need:
            raise ValueError(
                f"RAFTFlow with corr_levels={self.corr_levels} needs images of at least "
                f"{need}x{need} pixels (the coarsest correlation level must keep 2 pixels), got "
                f"{tuple(x.shape[-2:])}; use larger crops or fewer corr_levels"
            )


__all__ = ["CORR_DEFAULTS", "RAFTFlow"]
