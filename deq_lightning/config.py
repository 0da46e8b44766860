"""Structured-config schemas, so that a typo or a wrong type fails when Hydra composes.

The schemas are *derived* rather than written out: solver schemas from each registered solver's
options and defaults, backward schemas from each mode's defaults, and the trainer schema from
``pytorch_lightning.Trainer``'s signature. A new solver option or Trainer argument therefore needs
no change here. YAML options in ``conf/`` start from them (``- /schema/solver@_here_: anderson``):
``solver.mm=3`` fails with "Key 'mm' not in ...", ``solver.max_iter=abc`` with a type error.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from typing import Any, Optional

import pytorch_lightning as pl
from hydra.core.config_store import ConfigStore

from deq_lightning.deq import list_backwards, list_solvers, solver_options
from deq_lightning.deq.backward import IMPLICIT_DEFAULTS, get_backward

_PRIMITIVES = (int, float, bool, str)
# Options whose default is None but whose set values have a type: Broyden's memory, HyperAnderson's
# weights file.
_OPTIONAL_TYPES = {"memory": Optional[int], "path": Optional[str]}


def _type_of(key: str, default: Any) -> Any:
    if key in _OPTIONAL_TYPES:
        return _OPTIONAL_TYPES[key]
    if default is None:
        return Any
    if isinstance(default, bool):
        return bool
    return type(default) if isinstance(default, _PRIMITIVES) else Any


def _make(cls_name: str, values: dict[str, Any], extra: list | None = None, optional=False):
    """A dataclass with one typed field per value (all Optional with default None if asked)."""
    spec = []
    for key, default in values.items():
        typ = _type_of(key, default)
        if optional and typ is not Any:
            typ, default = Optional[typ], None
        spec.append((key, typ, dataclasses.field(default=default)))
    return dataclasses.make_dataclass(cls_name, spec + (extra or []))


def _all_solver_options() -> dict[str, Any]:
    values: dict[str, Any] = {}
    for name in list_solvers():
        values.update(solver_options(name))
    return values


def solver_schema(name: str):
    """All solvers' options (``name``'s defaults win), plus ``eval_opts`` laid over in eval.

    Every solver option carries the keys of the others, so that an experiment that tunes, say,
    Broyden's ``memory`` still composes with ``solver=anderson``; keys the chosen solver does not
    take are dropped when the DEQ is built (:func:`deq_lightning.tasks.base.deq_kwargs`). A key
    no solver knows still fails at composition. ``eval_opts`` has the same keys, all ``null``
    (= the training value) unless set.
    """
    values = {"name": name, **_all_solver_options(), **solver_options(name)}
    eval_opts = _make("EvalSolverOpts", _all_solver_options(), optional=True)
    extra = [("eval_opts", eval_opts, dataclasses.field(default_factory=eval_opts))]
    return _make(f"{name.title().replace('_', '')}SolverSchema", values, extra)


def backward_schema(name: str):
    """All backward modes' options (``name``'s defaults win); see :func:`solver_schema`.

    ``solver_opts`` holds the implicit backward solver's own options (e.g. Anderson's ``m``).
    """
    values: dict[str, Any] = {}
    for other in [*list_backwards(), name]:
        values.update(IMPLICIT_DEFAULTS if other == "implicit" else get_backward(other).defaults)
    extra = [("solver_opts", dict[str, Any], dataclasses.field(default_factory=dict))]
    return _make(f"{name.title().replace('_', '')}BackwardSchema", {"name": name, **values}, extra)


def _trainer_type(hint: Any) -> Any:
    """Keep exact primitive (or Optional primitive) types; anything richer becomes Any."""
    if hint in _PRIMITIVES:
        return hint
    args = typing.get_args(hint)
    if typing.get_origin(hint) is typing.Union and len(args) == 2 and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        if inner in _PRIMITIVES:
            return Optional[inner]
    return Any


def trainer_schema():
    hints = typing.get_type_hints(pl.Trainer.__init__)
    spec = [("_target_", str, dataclasses.field(default="pytorch_lightning.Trainer"))]
    for key, p in inspect.signature(pl.Trainer.__init__).parameters.items():
        if key == "self" or p.kind is p.VAR_KEYWORD:
            continue
        spec.append((key, _trainer_type(hints.get(key, Any)), dataclasses.field(default=p.default)))
    return dataclasses.make_dataclass("TrainerSchema", spec)


def register_schemas() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent; call before composing)."""
    cs = ConfigStore.instance()
    for name in list_solvers():
        cs.store(group="schema/solver", name=name, node=solver_schema(name))
    for name in list_backwards():
        cs.store(group="schema/backward", name=name, node=backward_schema(name))
    cs.store(group="schema", name="trainer", node=trainer_schema())
