"""Config -> DEQ in one place: the structured schemas, the translation, its validation.

The schemas are *derived* rather than written out: solver schemas from each registered solver's
typed options (:class:`~deq_lightning.deq.Option`), backward schemas from each mode's, and the
trainer schema from ``pytorch_lightning.Trainer``'s signature. A new solver option or Trainer
argument therefore needs no change here. YAML options in ``conf/`` start from them
(``- /schema/solver@_here_: anderson``): ``solver.mm=3`` fails with "Key 'mm' not in ...",
``solver.max_iter=abc`` with a type error.

:func:`deq_kwargs` turns the ``solver``/``backward`` nodes into :class:`~deq_lightning.deq.DEQ`
arguments, :func:`build_model` hands them to a model, and :func:`check_task_config` validates
them before any data is read, with errors in the keys a user types (:func:`user_keys`).
:class:`DEQSchedule` reads the task's own DEQ keys (pre-training, Jacobian term, jitter).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, NamedTuple, Optional

import hydra
import pytorch_lightning as pl
from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from torch import nn

from deq_lightning.deq import (
    DEQ,
    get_backward,
    list_backwards,
    list_solvers,
    solver_option_types,
    solver_options,
)

_PRIMITIVES = (int, float, bool, str)
# Keys of the nodes that are not options of the solver / backward mode.
_SOLVER_META = ("name", "eval_opts", "extra_ok")
_BACKWARD_META = ("name", "solver_opts", "extra_ok")


def plain(value: Any) -> Any:
    """Hydra containers -> dicts/lists (resolved); anything else unchanged."""
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


# ------------------------------------------------------------------------------ schemas


def _schema_type(typ: Any) -> Any:
    """A declared type as OmegaConf takes it: a primitive or ``Optional[primitive]``, else Any."""
    if typ in _PRIMITIVES:
        return typ
    args = typing.get_args(typ)
    union = typing.get_origin(typ) in (typing.Union, types.UnionType)
    if union and len(args) == 2 and type(None) in args:
        (inner,) = [a for a in args if a is not type(None)]
        if inner in _PRIMITIVES:
            return Optional[inner]
    return Any


def _optional(typ: Any) -> Any:
    return typ if typ is Any else Optional[typ]


def _union_of(owners: list[str], types_of: Any, what: str) -> dict[str, Any]:
    """Every owner's option -> its schema type; an option two owners share must agree."""
    out: dict[str, Any] = {}
    for owner in owners:
        for key, typ in types_of(owner).items():
            typ = _schema_type(typ)
            if out.setdefault(key, typ) != typ:
                raise TypeError(
                    f"{what} option '{key}' is {out[key]} elsewhere but {typ} in '{owner}'; "
                    "declare it with one type"
                )
    return out


def _fields(all_types: dict[str, Any], own: dict[str, Any]) -> list[tuple]:
    """One field per option: the owner's default for its own, ``None`` for the others'."""
    spec = []
    for key, typ in all_types.items():
        if key in own:
            spec.append((key, typ, dataclasses.field(default=own[key])))
        else:
            spec.append((key, _optional(typ), dataclasses.field(default=None)))
    return spec


def _class_name(name: str, kind: str) -> str:
    return f"{name.title().replace('_', '')}{kind}Schema"


def solver_schema(name: str):
    """``name``'s options with its defaults, every other solver's unset, plus ``eval_opts``.

    Every solver node carries the keys of the others (``null``), so that an experiment written
    for one solver still composes with another; :func:`deq_kwargs` then refuses a key set for a
    solver other than the chosen one, unless ``extra_ok``. A key no solver knows fails at
    composition. ``eval_opts`` has the same keys, all ``null`` (= the training value) unless set,
    and ``solver``: the solver of evaluation, ``null`` for the training one.
    """
    all_types = _union_of(list_solvers(), solver_option_types, "solver")
    eval_spec = [
        ("solver", Optional[str], dataclasses.field(default=None)),
        *_fields(all_types, {}),
    ]
    eval_opts = dataclasses.make_dataclass("EvalSolverOpts", eval_spec)
    spec = [
        ("name", str, dataclasses.field(default=name)),
        *_fields(all_types, solver_options(name)),
        ("extra_ok", bool, dataclasses.field(default=False)),
        ("eval_opts", eval_opts, dataclasses.field(default_factory=eval_opts)),
    ]
    return dataclasses.make_dataclass(_class_name(name, "Solver"), spec)


def _backward_types(name: str) -> dict[str, Any]:
    return {k: o.type for k, o in get_backward(name).options.items()}


def backward_schema(name: str):
    """``name``'s options with its defaults, the other modes' unset; see :func:`solver_schema`.

    ``solver_opts`` holds the implicit backward solver's own options (e.g. Anderson's ``m``).
    """
    all_types = _union_of(list_backwards(), _backward_types, "backward")
    spec = [
        ("name", str, dataclasses.field(default=name)),
        *_fields(all_types, get_backward(name).defaults),
        ("solver_opts", dict[str, Any], dataclasses.field(default_factory=dict)),
        ("extra_ok", bool, dataclasses.field(default=False)),
    ]
    return dataclasses.make_dataclass(_class_name(name, "Backward"), spec)


def trainer_schema():
    hints = typing.get_type_hints(pl.Trainer.__init__)
    spec = [("_target_", str, dataclasses.field(default="pytorch_lightning.Trainer"))]
    for key, p in inspect.signature(pl.Trainer.__init__).parameters.items():
        if key == "self" or p.kind is p.VAR_KEYWORD:
            continue
        spec.append((key, _schema_type(hints.get(key, Any)), dataclasses.field(default=p.default)))
    return dataclasses.make_dataclass("TrainerSchema", spec)


def register_schemas() -> None:
    """Store the schemas in Hydra's ConfigStore (idempotent; call before composing)."""
    cs = ConfigStore.instance()
    for name in list_solvers():
        cs.store(group="schema/solver", name=name, node=solver_schema(name))
    for name in list_backwards():
        cs.store(group="schema/backward", name=name, node=backward_schema(name))
    cs.store(group="schema", name="trainer", node=trainer_schema())


# ------------------------------------------------------------------------------ config -> DEQ


def _extra_ok(node: Mapping, where: str) -> bool:
    """The node's ``extra_ok``. A node without the key was written before the schemas had it
    (saved runs and checkpoints), when every node held every solver's defaults: its keys of
    other solvers are ignored, as they were then."""
    value = node.get("extra_ok", True)
    if not isinstance(value, bool):
        raise ValueError(f"{where}.extra_ok must be true or false, got {value!r}")
    return value


class _Node(NamedTuple):
    """One node of solver/backward options: its config path, its values, the options its owner
    (the chosen solver or mode, as ``(key, value)``) takes, and its keys that are no options."""

    where: str
    values: Mapping
    takes: Mapping
    owner: tuple[str, str]
    meta: tuple[str, ...] = ()

    def set_keys(self) -> list[str]:
        return [k for k, v in self.values.items() if k not in self.meta and v is not None]


def _option_nodes(solver: Mapping, backward: Mapping) -> list[_Node]:
    """``solver``, ``solver.eval_opts``, ``backward`` and ``backward.solver_opts`` (the options
    of the inner solver of a mode that has one, such as ``implicit``)."""
    name, mode = solver["name"], get_backward(backward["name"])
    takes, own = solver_options(name), ("solver", name)
    eval_values = solver.get("eval_opts") or {}
    eval_name = eval_values.get("solver") or name
    try:
        eval_takes = solver_options(eval_name)
    except ValueError as e:
        raise ValueError(f"solver.eval_opts.solver: {e}") from None
    eval_owner = own if eval_name == name else ("solver.eval_opts.solver", eval_name)
    inner = (
        (backward.get("solver") or mode.defaults["solver"]) if "solver" in mode.options else None
    )
    inner_owner = ("backward.solver", inner) if inner else ("backward", mode.name)
    return [
        _Node("solver", solver, takes, own, _SOLVER_META),
        _Node("solver.eval_opts", eval_values, eval_takes, eval_owner, ("solver",)),
        _Node("backward", backward, mode.options, ("backward", mode.name), _BACKWARD_META),
        _Node(
            "backward.solver_opts",
            backward.get("solver_opts") or {},
            solver_options(inner) if inner else {},
            inner_owner,
        ),
    ]


def _pick(node: _Node, extra_ok: bool) -> dict:
    """The set values of ``node`` that its owner takes; a set key it does not take raises
    unless ``extra_ok``."""
    keys = node.set_keys()
    foreign = [k for k in keys if k not in node.takes]
    if foreign and not extra_ok:
        top = node.where.split(".")[0]
        others = "solvers" if top == "solver" else "backward modes"
        shown = ", ".join(f"{node.where}.{k}={node.values[k]}" for k in foreign)
        one = len(foreign) == 1
        raise ValueError(
            f"{shown} {'is not an option' if one else 'are not options'} of "
            f"{'='.join(node.owner)} (its options: {', '.join(node.takes) or 'none'}); remove "
            f"{'it' if one else 'them'}, or set {top}.extra_ok=true to ignore keys of other "
            f"{others}"
        )
    return {k: node.values[k] for k in keys if k in node.takes}


def deq_kwargs(solver: dict, backward: dict) -> dict:
    """The ``conf/solver`` and ``conf/backward`` nodes -> :class:`~deq_lightning.deq.DEQ` kwargs.

    Only the set options of the chosen solver and backward mode are passed on (unset ones keep
    the DEQ's defaults). A key set for another solver or mode raises, naming the keys the chosen
    one takes, unless the node has ``extra_ok: true``. A mode with an inner solver (``implicit``)
    also takes that solver's own options from ``backward.solver_opts``.
    """
    ok = {"solver": _extra_ok(solver, "solver"), "backward": _extra_ok(backward, "backward")}
    picked = [_pick(n, ok[n.where.split(".")[0]]) for n in _option_nodes(solver, backward)]
    solver_opts, eval_opts, backward_opts, inner_opts = picked
    return {
        "solver": solver["name"],
        "solver_opts": solver_opts,
        "eval_solver_opts": eval_opts,
        "eval_solver": (solver.get("eval_opts") or {}).get("solver"),
        "backward": backward["name"],
        "backward_opts": {**backward_opts, **inner_opts},
    }


def _typed(path: str, typed: set[str]) -> bool:
    """Whether the command line set ``path`` or a node above it (a group choice such as
    ``solver=broyden`` does not count: it picks the node, it sets no key)."""
    return any(path == t or (path.startswith(t + ".") and "." in t) for t in typed)


def drop_unused_keys(cfg: DictConfig, typed: set[str]) -> list[str]:
    """Null the ``solver``/``backward`` keys that a config file (an experiment, the defaults) set
    for another solver or backward mode than the chosen one, and return their paths.

    ``python train.py backward=phantom`` on a config written for the implicit backward should
    run, not fail on that config's ``backward.max_iter``; a key the user typed (``typed``, the
    command line's keys) is kept, so that :func:`deq_kwargs` rejects it by name.
    """
    solver, backward = cfg.get("solver"), cfg.get("backward")
    if solver is None or backward is None:
        return []
    tops = {"solver": solver, "backward": backward}
    dropped = []
    for node in _option_nodes(solver, backward):
        if tops[node.where.split(".")[0]].get("extra_ok", True) is True:
            continue
        for key in node.set_keys():
            path = f"{node.where}.{key}"
            if key not in node.takes and not _typed(path, typed):
                with open_dict(node.values):
                    node.values[key] = None
                dropped.append(path)
    return dropped


def build_model(model: dict, solver: dict | None, backward: dict | None) -> nn.Module:
    """Instantiate ``model`` (a ``_target_`` dict), handing DEQ models the solver/backward config."""
    if not isinstance(model, dict) or "_target_" not in model:
        raise ValueError(f"task.model must be a config with a _target_, got {model!r}")
    cls = hydra.utils.get_class(model["_target_"]) if "." in model["_target_"] else None
    takes_deq = cls is not None and "deq" in inspect.signature(cls).parameters
    cfg = dict(model)
    if takes_deq and solver is not None and backward is not None:
        cfg["deq"] = {**deq_kwargs(solver, backward), **(cfg.get("deq") or {})}
    return hydra.utils.instantiate(cfg, _convert_="all")


def is_run_fraction(value: float) -> bool:
    """Whether a schedule point (a step count, or a fraction below 1 of the run) is a fraction:
    it becomes a step only once the run's length is known."""
    return 0 < value < 1


@dataclasses.dataclass
class DEQSchedule:
    """When and how the DEQ runs during training (the thesis's flag in brackets)."""

    pretrain_steps: float = 0  # shallow unrolled pre-training: steps, or a fraction < 1 of the run
    # [pretrain_steps]
    pretrain_unroll: int = 2  # f applications while pre-training [n_layer / NUM_LAYERS]
    jac_loss_weight: float = 0.0  # gamma of the Jacobian term [jac_loss_weight]
    jac_loss_freq: float = 0.0  # probability of a Jacobian step [jac_loss_freq]
    jac_incremental: int = 0  # add jac_increment every N DEQ steps, 0 = never [jac_incremental]
    jac_increment: float = 0.1  # the thesis adds 0.1
    jac_stop_epoch: int | None = None  # no Jacobian term from this epoch on [JAC_STOP_EPOCH]
    pretrain_jac_loss_weight: float = 0.0  # Jacobian term during pre-training [PRETRAIN_JAC_...]
    residual_loss_weight: float = 0.0  # weight of the residual term at z* (ours, not thesis)
    residual_loss_start: float = 0.0  # the term from this step on (steps, or a fraction < 1)
    max_iter_jitter: int = 0  # train max_iter ~ U{max_iter - jitter, max_iter} [rand_f_thres_delta]
    spectral_radius_every: int = 0  # power method at validation every N epochs, 0 = off

    @classmethod
    def of(cls, options: dict[str, Any]) -> DEQSchedule:
        """The schedule from the task's options; an unknown key raises, listing the known."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"unknown task option(s) {unknown}; known: {', '.join(sorted(known))}")
        return cls(**options)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if v is not None and v < 0:
                raise ValueError(f"task.{f.name} must be >= 0, got {v}")
        if self.jac_loss_freq > 1:
            raise ValueError(f"task.jac_loss_freq is a probability, got {self.jac_loss_freq}")
        if self.pretrain_unroll < 1:
            raise ValueError(f"task.pretrain_unroll must be >= 1, got {self.pretrain_unroll}")

    def resolved(self, total_steps: float) -> DEQSchedule:
        """This schedule with its points given as fractions < 1 of the run (``pretrain_steps``,
        ``residual_loss_start``) turned into step counts of a ``total_steps``-step run."""

        def steps(value: float) -> float:
            if not is_run_fraction(value):
                return value
            if not math.isfinite(total_steps):
                raise ValueError(
                    f"a task schedule point of {value} is a fraction of the run, but this run has "
                    "no set length: give it in steps, or set trainer.max_steps or max_epochs"
                )
            return round(value * total_steps)

        return dataclasses.replace(
            self,
            pretrain_steps=steps(self.pretrain_steps),
            residual_loss_start=steps(self.residual_loss_start),
        )

    def jac_weight(self, step: int, epoch: int, pretraining: bool) -> float:
        if self.jac_stop_epoch is not None and epoch >= self.jac_stop_epoch:
            return 0.0
        if pretraining:
            return self.pretrain_jac_loss_weight
        deq_steps = max(0, step - self.pretrain_steps)
        bonus = (
            self.jac_increment * (deq_steps // self.jac_incremental) if self.jac_incremental else 0
        )
        return self.jac_loss_weight + bonus if self.jac_loss_weight > 0 else 0.0


# The DEQ's argument names -> the config keys a user types (backward_opts.tol -> backward.tol).
_USER_KEYS = (
    (re.compile(r"\beval_solver_opts[:.]\s*(\w+)"), r"solver.eval_opts.\1"),
    (re.compile(r"\bbackward_opts[:.]\s*(?:backward_opts[:.]\s*)?(\w+)"), r"backward.\1"),
    (re.compile(r"\bunknown backward_opts\b"), "unknown backward option(s)"),
    (re.compile(r"^(\w+) must be"), r"solver.\1 must be"),
)


def user_keys(error: Exception | str) -> str:
    """An error of the DEQ core, with its internal argument names replaced by config keys."""
    text = str(error)
    for pattern, key in _USER_KEYS:
        text = pattern.sub(key, text)
    return text


def check_task_config(task: DictConfig) -> None:
    """Build the task's DEQ arguments and a DEQ from them, so that a bad solver or backward
    option fails before any data is read, naming the config key."""
    if "solver" not in task or "backward" not in task:
        return
    try:
        DEQ(**deq_kwargs(plain(task.solver), plain(task.backward)))
    except ValueError as e:
        raise ValueError(
            f"invalid solver/backward config (conf groups solver, backward): {user_keys(e)}"
        ) from None
