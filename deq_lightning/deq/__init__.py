"""The equilibrium core: solvers, backward modes, the DEQ layer, Jacobian tools, norms, dropout.

Pure torch: nothing here knows about Lightning or Hydra.

How to add a solver: write ``fn(f, x0, run, **options) -> FlatResult`` on the flat
``(batch, dim)`` state, using ``run.mon`` (:class:`~.kit.Monitor`: ``evaluate``, ``observe``,
``shrink``, ``hold``), ``run.rec`` and ``run.max_iter``, and ending with ``run.result(name,
nfe)``; :class:`~.kit.AndersonMixer` gives Anderson's mixing step. Register it with
``@register_solver("name", opt=Option(default, type, check))`` (checks in :mod:`.kit`); the
common options (``max_iter``, ``tol``, ...) come with every solver. Import its module here: the
config schemas (``solver=name``, typed keys) then follow from the registry, and ``conf/solver/``
needs a two-line YAML starting from ``/schema/solver@_here_: name``.

How to add a backward mode: ``register_backward(BackwardMode(name, {key: Option(...)}, solves,
attach))`` in :mod:`.backward`, where ``attach(f, z*, opts, stats)`` returns an
:class:`~.backward.Attached` with the graph; add ``conf/backward/<name>.yaml`` likewise.
"""

from .backward import get_backward, list_backwards, register_backward
from .dropout import VariationalDropout
from .hyper import HyperAndersonNet, capture_problems, load_hypersolver, save_hypersolver
from .jacobian import jac_loss_estimate, residual_loss, spectral_radius
from .kit import Option
from .layer import DEQ, deq_override
from .norm import apply_weight_norm, has_weight_norm, weight_norm
from .scope import forward_scope
from .solvers import (
    check_solver_options,
    get_solver,
    list_solvers,
    register_solver,
    solve,
    solver_option_types,
    solver_options,
)
from .state import StateSpec
from .stats import DEQStats, SolverStats, Status

__all__ = [
    "DEQ",
    "DEQStats",
    "HyperAndersonNet",
    "Option",
    "SolverStats",
    "StateSpec",
    "Status",
    "VariationalDropout",
    "apply_weight_norm",
    "capture_problems",
    "check_solver_options",
    "deq_override",
    "forward_scope",
    "get_backward",
    "get_solver",
    "has_weight_norm",
    "jac_loss_estimate",
    "list_backwards",
    "list_solvers",
    "load_hypersolver",
    "register_backward",
    "register_solver",
    "residual_loss",
    "save_hypersolver",
    "solve",
    "solver_option_types",
    "solver_options",
    "spectral_radius",
    "weight_norm",
]
