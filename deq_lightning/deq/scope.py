"""Per-forward state: values computed once per DEQ call and shared by all of its solver steps.

A DEQ evaluates its layer f tens of times per forward pass. Weight normalisation and variational
dropout must behave as if f were applied once: the normalised weight is computed once (not per
step) and one dropout mask is drawn and reused by every solver step, by the gradient steps and by
the implicit backward. :class:`DEQ` opens a :class:`ForwardScope` for the duration of its call;
layers ask the active scope for their value and compute it only on first use. The scope lives in a
``ContextVar`` rather than on the modules so that f can be any callable (a closure over the
input, a bound method) and the DEQ never has to discover which modules f uses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

_ACTIVE: ContextVar[ForwardScope | None] = ContextVar("deq_forward_scope", default=None)
# The rows of the original batch that f is being evaluated on (batch compaction), or None.
_INDEX: ContextVar[Tensor | None] = ContextVar("deq_batch_index", default=None)


class ForwardScope:
    """Cache of per-forward values, keyed by the object that owns them."""

    def __init__(self, grad_enabled: bool) -> None:
        # Values are made with the caller's grad mode even when first needed inside the
        # no-grad solver, so that gradients later reach the parameters they came from.
        self.grad_enabled = grad_enabled
        self._values: dict[tuple[int, str], Tensor] = {}

    def get(self, owner: object, key: str, make: Callable[[], Tensor]) -> Tensor:
        k = (id(owner), key)
        if k not in self._values:
            with torch.set_grad_enabled(self.grad_enabled):
                self._values[k] = make()
        return self._values[k]


def active_scope() -> ForwardScope | None:
    return _ACTIVE.get()


@contextmanager
def forward_scope() -> Iterator[ForwardScope]:
    """Open a scope for one DEQ call; a nested DEQ call shares its caller's scope."""
    outer = _ACTIVE.get()
    if outer is not None:
        yield outer
        return
    scope = ForwardScope(torch.is_grad_enabled())
    token = _ACTIVE.set(scope)
    try:
        yield scope
    finally:
        _ACTIVE.reset(token)


def per_forward(owner: object, key: str, make: Callable[[], Tensor]) -> Tensor:
    """``make()`` once per DEQ call (every time outside one)."""
    scope = _ACTIVE.get()
    return make() if scope is None else scope.get(owner, key, make)


@contextmanager
def batch_index(index: Tensor | None) -> Iterator[None]:
    """Mark f's current call as running on rows ``index`` of the batch (batch compaction).

    Per-forward values with a batch dimension (dropout masks) are drawn on the full batch at the
    first call and read back with :func:`active_index` on the rows still being solved.
    """
    token = _INDEX.set(index)
    try:
        yield
    finally:
        _INDEX.reset(token)


def active_index() -> Tensor | None:
    """The batch rows of the current f call under compaction; None when f sees the whole batch."""
    return _INDEX.get()
