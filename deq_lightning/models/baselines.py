"""Explicit (layered) baselines, so a DEQ can be compared with a feed-forward net on the same data.

Any timm architecture, built from scratch, behind the models' common interface
``forward(x) -> ModelOutput(output, stats)`` with ``stats=None`` (no equilibrium to report).
"""

from __future__ import annotations

import difflib

import timm
from torch import Tensor, nn

from deq_lightning.models.contract import ModelOutput


class TimmClassifier(nn.Module):
    """``timm.create_model(name, num_classes=..., in_chans=...)`` with random weights.

    ``model_kwargs`` go to timm unchanged (e.g. ``{"drop_rate": 0.1}``). Pretrained weights would
    need a download (and would make the comparison with a DEQ trained from scratch unfair), so
    ``pretrained=True`` is refused.
    """

    def __init__(
        self,
        name: str = "resnet18",
        num_classes: int = 10,
        in_channels: int = 3,
        pretrained: bool = False,
        model_kwargs: dict | None = None,
    ) -> None:
        super().__init__()
        if pretrained:
            raise ValueError(
                "model.pretrained=true is not supported: pretrained weights must be downloaded and "
                "baselines here are trained from scratch like the DEQs; set model.pretrained=false"
            )
        if not timm.is_model(name):
            close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
            hint = f"; similar names: {', '.join(close)}" if close else ""
            raise ValueError(
                f"unknown timm model '{name}' (model.name){hint}. "
                "List them with: python -c \"import timm; print(timm.list_models('*resnet*'))\""
            )
        self.net = timm.create_model(
            name,
            pretrained=False,
            num_classes=num_classes,
            in_chans=in_channels,
            **(model_kwargs or {}),
        )

    def forward(self, x: Tensor) -> ModelOutput:
        return ModelOutput(self.net(x), None)


__all__ = ["TimmClassifier"]
