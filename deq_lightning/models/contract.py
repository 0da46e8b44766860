"""What every model gives its task: one typed output, ``ModelOutput(output, stats)``.

A task never guesses what a model returned: the model's ``forward`` returns a
:class:`ModelOutput`, whose ``output`` is the family's prediction (logits, a dict of flows,
an ``LMOutput``) and whose ``stats`` are the DEQ's :class:`DEQStats`, or ``None``
for a layered twin or a baseline. It is a ``NamedTuple``, so ``output, stats = model(x)``
keeps working.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol, runtime_checkable

from deq_lightning.deq.stats import DEQStats


class ModelOutput(NamedTuple):
    """A model's prediction and, for a DEQ, the diagnostics of its solve."""

    output: Any
    stats: DEQStats | None = None


@runtime_checkable
class Model(Protocol):
    """The model contract: a module whose call returns :class:`ModelOutput`.

    DEQ models take a ``deq`` argument (the DEQ settings built from ``conf/solver`` and
    ``conf/backward``); layered twins and baselines do not.
    """

    def __call__(self, *args: Any, **kwargs: Any) -> ModelOutput: ...
