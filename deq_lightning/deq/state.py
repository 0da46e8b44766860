"""Flat batched views of DEQ states.

Every solver works on one ``(batch, dim)`` tensor so that per-sample residuals, Anderson mixing and
Broyden updates are single batched operations. Models, however, carry states of any structure: one
tensor, or a tuple/list of tensors of different shapes (MDEQ's resolution streams, DEQ-Flow's
(hidden, flow) pair). :class:`StateSpec` records that structure once and converts both ways.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

State = Tensor | Sequence[Tensor]

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def solver_dtype(dtype: torch.dtype) -> torch.dtype:
    """Half-precision states are solved in float32: bf16 cannot resolve a residual of 1e-3."""
    return torch.float32 if dtype in _LOW_PRECISION else dtype


@dataclass(frozen=True)
class StateSpec:
    """The structure of a state: tensor or sequence, and each leaf's per-sample shape and dtype."""

    is_tensor: bool
    container: type
    shapes: tuple[torch.Size, ...]
    dtypes: tuple[torch.dtype, ...]
    batch: int

    @classmethod
    def of(cls, z: State) -> StateSpec:
        leaves = [z] if isinstance(z, Tensor) else list(z)
        if not leaves or not all(isinstance(t, Tensor) for t in leaves):
            raise TypeError(
                "a DEQ state must be a tensor or a non-empty tuple/list of tensors, "
                f"got {type(z).__name__} of {[type(t).__name__ for t in leaves]}"
            )
        batch = leaves[0].shape[0] if leaves[0].dim() else 1
        for i, t in enumerate(leaves):
            if t.dim() == 0 or t.shape[0] != batch:
                raise ValueError(
                    f"every tensor of a DEQ state needs the batch as dim 0; leaf {i} has shape "
                    f"{tuple(t.shape)} but leaf 0 has batch {batch}"
                )
        return cls(
            is_tensor=isinstance(z, Tensor),
            container=type(z),
            shapes=tuple(t.shape[1:] for t in leaves),
            dtypes=tuple(t.dtype for t in leaves),
            batch=batch,
        )

    @property
    def sizes(self) -> list[int]:
        return [s.numel() for s in self.shapes]

    @property
    def dim(self) -> int:
        return sum(self.sizes)

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the solver runs in: the widest leaf dtype, never below float32."""
        widest = max(self.dtypes, key=lambda d: torch.finfo(d).bits if d.is_floating_point else 0)
        return solver_dtype(widest)

    def flatten(self, z: State, batch: int | None = None) -> Tensor:
        """Structure -> ``(batch, dim)`` in the solver dtype (differentiable).

        ``batch`` is the expected number of rows when f ran on part of the batch (compaction).
        """
        batch = self.batch if batch is None else batch
        leaves = [z] if isinstance(z, Tensor) else list(z)
        if len(leaves) != len(self.shapes):
            raise ValueError(
                f"f returned {len(leaves)} tensors but the state has {len(self.shapes)}; "
                "f must map a state to a state of the same structure"
            )
        flat = []
        for i, (t, shape) in enumerate(zip(leaves, self.shapes)):
            if t.shape[1:] != shape or t.shape[0] != batch:
                raise ValueError(
                    f"f changed the shape of state leaf {i}: expected "
                    f"{(batch, *shape)}, got {tuple(t.shape)}"
                )
            flat.append(t.reshape(batch, -1).to(self.dtype))
        return flat[0] if len(flat) == 1 else torch.cat(flat, dim=1)

    def unflatten(self, x: Tensor, cast: bool = False) -> State:
        """``(rows, dim)`` -> structure (views, differentiable). ``cast`` restores leaf dtypes.

        ``rows`` is the batch, or fewer rows when f runs on part of it (compaction).
        """
        parts = [x] if len(self.shapes) == 1 else torch.split(x, self.sizes, dim=1)
        leaves = []
        for p, shape, dtype in zip(parts, self.shapes, self.dtypes):
            t = p.reshape(x.shape[0], *shape)
            leaves.append(t.to(dtype) if cast else t)
        if self.is_tensor:
            return leaves[0]
        return list(leaves) if self.container is list else tuple(leaves)
