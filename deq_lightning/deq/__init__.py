"""The equilibrium core: solvers, backward modes, the DEQ layer, Jacobian tools, norms, dropout.

Pure torch: nothing here knows about Lightning or Hydra.
"""

from .backward import get_backward, list_backwards, register_backward
from .dropout import VariationalDropout
from .hyper import HyperAndersonNet, capture_problems, load_hypersolver, save_hypersolver
from .jacobian import jac_loss_estimate, spectral_radius
from .layer import DEQ, deq_override
from .norm import apply_weight_norm, has_weight_norm, weight_norm
from .scope import forward_scope
from .solvers import (
    check_solver_options,
    get_solver,
    list_solvers,
    register_solver,
    solve,
    solver_options,
)
from .state import StateSpec
from .stats import DEQStats, SolverStats, Status

__all__ = [
    "DEQ",
    "DEQStats",
    "HyperAndersonNet",
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
    "save_hypersolver",
    "solve",
    "solver_options",
    "spectral_radius",
    "weight_norm",
]
