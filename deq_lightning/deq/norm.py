"""Weight normalisation that is computed once per DEQ forward, not once per solver step."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .scope import per_forward

WEIGHT_NORM_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class _WeightNormHook:
    """Forward pre-hook setting ``module.<name>`` to ``g * v / ||v||`` (a picklable object)."""

    def __init__(self, name: str, dim: int) -> None:
        self.name, self.dim = name, dim

    def compute(self, module: nn.Module) -> Tensor:
        g = getattr(module, self.name + "_g")
        v = getattr(module, self.name + "_v")
        dims = [d for d in range(v.dim()) if d != self.dim]
        return v * (g / torch.linalg.vector_norm(v, dim=dims, keepdim=True))

    def __call__(self, module: nn.Module, inputs: object) -> None:
        setattr(module, self.name, per_forward(module, self.name, lambda: self.compute(module)))


def weight_norm(module: nn.Module, name: str = "weight", dim: int = 0) -> nn.Module:
    """Reparametrise ``module.<name>`` as ``g * v / ||v||`` (per output unit along ``dim``).

    Inside a :class:`~deq_lightning.deq.DEQ` call the weight is computed at the first use and
    shared by every later one; outside a DEQ it is recomputed at each call.
    """
    if has_weight_norm(module, name):
        return module
    weight = getattr(module, name)
    del module._parameters[name]
    dims = [d for d in range(weight.dim()) if d != dim]
    module.register_parameter(
        name + "_g", nn.Parameter(torch.linalg.vector_norm(weight.detach(), dim=dims, keepdim=True))
    )
    module.register_parameter(name + "_v", nn.Parameter(weight.detach().clone()))
    hook = _WeightNormHook(name, dim)
    setattr(module, name, hook.compute(module).detach())
    module.register_forward_pre_hook(hook)
    return module


def has_weight_norm(module: nn.Module, name: str = "weight") -> bool:
    return any(
        isinstance(h, _WeightNormHook) and h.name == name
        for h in module._forward_pre_hooks.values()
    )


def apply_weight_norm(module: nn.Module, types: tuple[type, ...] = WEIGHT_NORM_TYPES) -> nn.Module:
    """Weight-normalise every linear/conv layer inside ``module`` (in place); returns it."""
    for m in module.modules():
        if isinstance(m, types) and getattr(m, "weight", None) is not None:
            weight_norm(m)
    return module
