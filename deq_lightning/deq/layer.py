"""The DEQ layer: solve for z* = f(z*), then attach gradients as the backward mode says."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext

import torch
from torch import Tensor, nn

from .backward import Attached, get_backward, unroll
from .jacobian import jac_loss_estimate, residual_loss, spectral_radius
from .scope import forward_scope
from .solvers import (
    COMMON_OPTIONS,
    autocast_state,
    check_solver_options,
    flat_fn,
    get_solver,
    run_flat,
)
from .state import State, StateSpec
from .stats import DEQStats

_OVERRIDABLE = (
    "solver",
    "solver_opts",
    "eval_solver",
    "eval_solver_opts",
    "backward",
    "backward_opts",
    "compute_jac_loss",
    "compute_residual_loss",
    "compute_spectral_radius",
)


def record_steps(max_iter: int, n_states: int) -> list[int]:
    """Iterations at which to keep intermediate states: ``n_states - 1`` evenly spaced ones."""
    return sorted(
        {min(max(1, (max_iter * i) // n_states), max_iter - 1) for i in range(1, n_states)}
    )


class DEQ(nn.Module):
    """A deep equilibrium layer: ``deq(f, z0) -> (z*, stats)``.

    ``f`` maps a state (a tensor, or a tuple/list of tensors, batch first) to a state of the same
    structure; it is usually a closure over the input injection. The solve runs without a graph;
    gradients then reach f's parameters (and whatever f closes over) as ``backward`` says:
    ``implicit`` (default), ``phantom``, ``one_step`` or ``unrolled`` (see :mod:`.backward`).

    ``solver_opts`` are the forward solver's options (``max_iter``, ``tol``, ``stop_mode`` and the
    solver's own, e.g. Anderson's ``m``); ``eval_solver_opts`` are laid over them in eval mode (the
    thesis raises the budget at test time). ``eval_solver`` (``None``: ``solver``) solves in eval
    mode instead: a cheap training solve (plain iteration) can then be checked by one that
    reaches the fixed point (Anderson); it keeps the common options (``max_iter``, ``tol``, ...)
    of ``solver_opts`` and takes its own from ``eval_solver_opts``. Unknown keys and impossible
    values raise at once.
    Set ``compute_jac_loss`` / ``compute_residual_loss`` / ``compute_spectral_radius`` (usually
    through :meth:`override`) to get ``stats.jac_loss``, ``stats.residual_loss`` (both
    differentiable) and ``stats.spectral_radius`` at the equilibrium.

    Batch compaction (solver option ``compact``, on in eval mode by default): an f that accepts
    an ``index`` keyword is called as ``f(z_rows, index=rows)`` once samples have converged, and
    must then return ``f(z_full)[rows]``, index-selecting whatever it closes over that has a batch
    dimension (see :func:`~.solvers.takes_index`). Per-forward dropout masks are index-selected
    by the core. An f without ``index`` keeps every row and freezes stopped samples.
    """

    def __init__(
        self,
        solver: str = "anderson",
        backward: str = "implicit",
        solver_opts: dict | None = None,
        backward_opts: dict | None = None,
        eval_solver_opts: dict | None = None,
        eval_solver: str | None = None,
        jac_samples: int = 1,
        spectral_radius_iters: int = 50,
    ) -> None:
        super().__init__()
        self.solver = solver
        self.solver_opts = dict(solver_opts or {})
        self.eval_solver_opts = dict(eval_solver_opts or {})
        self.eval_solver = eval_solver
        self.backward = backward
        self.backward_opts = dict(backward_opts or {})
        self.jac_samples = jac_samples
        self.spectral_radius_iters = spectral_radius_iters
        self.compute_jac_loss = False
        self.compute_residual_loss = False
        # The residual term's measure, on (f(z), z) in f's state structure; a model may set its
        # own (DEQ-Flow: the flow's update in pixels). Default: the relative residual.
        self.residual_measure: Callable[[State, State], Tensor] = residual_loss
        # Set when f's module is compiled (task.compile): the Jacobian terms, which need f's
        # double backward, then evaluate f eagerly.
        self.eager_jacobian = False
        self.compute_spectral_radius = False
        # Called as on_solve(flat_f, z0, z*) after each forward solve; hyper.capture_problems
        # sets it to collect the problems a learned solver is trained on.
        self.on_solve: Callable[[Callable[[Tensor], Tensor], Tensor, Tensor], None] | None = None
        self.check()

    def check(self) -> None:
        """Validate the configuration; raises ``ValueError`` naming the offending key."""
        get_solver(self.solver)
        check_solver_options(self.solver, self.solver_opts)
        if self.eval_solver is not None:
            try:
                get_solver(self.eval_solver)
            except ValueError as e:  # the registry's "unknown solver ..., known: ..."
                raise ValueError(f"eval_solver: {e}") from None
        try:
            check_solver_options(self.active_solver(eval_mode=True), self._eval_opts())
        except ValueError as e:
            raise ValueError(f"eval_solver_opts: {e}") from None
        get_backward(self.backward).check(self.backward_opts)

    def extra_repr(self) -> str:
        return (
            f"solver={self.solver!r}, solver_opts={self.solver_opts}, backward={self.backward!r}, "
            f"backward_opts={self.backward_opts}, eval_solver={self.eval_solver!r}, "
            f"eval_solver_opts={self.eval_solver_opts}"
        )

    def active_solver_opts(self) -> dict:
        """The solver options in force now (eval ones laid over in eval mode), with defaults.

        ``compact="eval"`` is resolved here: "on" in eval mode, "off" in training.
        """
        opts = self.solver_opts if self.training else self._eval_opts()
        full = check_solver_options(self.active_solver(), opts)
        if full["compact"] == "eval":
            full["compact"] = "off" if self.training else "on"
        return full

    def active_solver(self, eval_mode: bool | None = None) -> str:
        """The solver in force: ``eval_solver`` (if set) in eval mode, else ``solver``.
        ``eval_mode`` asks for one mode; ``None``: the module's current one."""
        evaluating = not self.training if eval_mode is None else eval_mode
        return (self.eval_solver or self.solver) if evaluating else self.solver

    def _eval_opts(self) -> dict:
        """``eval_solver_opts`` over the training options, only the common ones of those when
        the evaluation solver is another than the training one."""
        base = self.solver_opts
        if self.active_solver(eval_mode=True) != self.solver:
            base = {k: v for k, v in base.items() if k in COMMON_OPTIONS}
        return {**base, **self.eval_solver_opts}

    @contextmanager
    def override(self, **changes: object) -> Iterator[DEQ]:
        """Temporarily change settings (pre-training, a jittered budget, Jacobian terms).

        Dict settings are merged into the current ones, except that a new ``backward``/``solver``
        starts from that mode's/solver's defaults unless its options are given too.
        """
        unknown = sorted(set(changes) - set(_OVERRIDABLE))
        if unknown:
            raise ValueError(f"cannot override {unknown}; overridable: {', '.join(_OVERRIDABLE)}")
        saved = {k: getattr(self, k) for k in _OVERRIDABLE}
        after = {**saved, **changes}
        # Each options dict and the solver or mode it belongs to (before, after the change).
        owners = {
            "solver_opts": (saved["solver"], after["solver"]),
            "eval_solver_opts": (
                saved["eval_solver"] or saved["solver"],
                after["eval_solver"] or after["solver"],
            ),
            "backward_opts": (saved["backward"], after["backward"]),
        }
        for key, (before, now) in owners.items():
            if key in changes:
                value = dict(changes[key])
                after[key] = value if before != now else {**saved[key], **value}
            elif before != now:  # a new owner starts from its defaults
                common = key == "eval_solver_opts"
                after[key] = {k: v for k, v in saved[key].items() if common and k in COMMON_OPTIONS}
        for key, value in after.items():
            setattr(self, key, value)
        try:
            self.check()
            yield self
        finally:
            for k, v in saved.items():
                setattr(self, k, v)

    def forward(self, f: Callable[[State], State], z0: State) -> tuple[State, DEQStats]:
        states, stats = self._run(f, z0, n_states=1)
        return states[-1], stats

    def trajectory(
        self, f: Callable[[State], State], z0: State, n_states: int
    ) -> tuple[list[State], DEQStats]:
        """``n_states`` states along the solve, each with gradient attached, the last one z*.

        The intermediate states are taken at evenly spaced iterations of the budget (or are z*
        when the solve stopped before); DEQ-Flow supervises all of them (fixed-point correction).
        """
        if n_states < 1:
            raise ValueError(f"n_states must be >= 1, got {n_states}")
        return self._run(f, z0, n_states)

    def _run(
        self, f: Callable[[State], State], z0: State, n_states: int
    ) -> tuple[list[State], DEQStats]:
        spec = StateSpec.of(z0)
        x0 = spec.flatten(z0)
        mode = get_backward(self.backward)
        bopts = mode.check(self.backward_opts)
        sopts = self.active_solver_opts()
        with forward_scope():
            g = flat_fn(f, spec, autocast_state(x0.device), x0.device)
            if mode.solves:
                res = run_flat(
                    self.active_solver(), g, x0, sopts, record_steps(sopts["max_iter"], n_states)
                )
                if self.on_solve is not None:
                    self.on_solve(g, x0.detach(), res.z)
                stats = DEQStats(forward=res.stats, mode=self.backward)
                starts = res.states + [res.z] * (n_states - len(res.states))
                outs = [mode.attach(g, s, bopts, stats) for s in starts]
            else:
                states, fwd = unroll(
                    g,
                    x0,
                    bopts["steps"],
                    record_steps(bopts["steps"], n_states),
                    sopts["tol"],
                    sopts["stop_mode"],
                )
                states += states[-1:] * (n_states - len(states))
                stats = DEQStats(forward=fwd, mode=self.backward)
                outs = [Attached(s) for s in states]
            self._equilibrium_terms(g, outs[-1], stats, spec)
        return [spec.unflatten(o.z) for o in outs], stats

    def _equilibrium_terms(
        self, g: Callable[[Tensor], Tensor], out: Attached, stats: DEQStats, spec: StateSpec
    ) -> None:
        """The terms evaluated at the equilibrium on request: the Jacobian term, the residual
        term and the spectral radius, sharing one differentiable ``f(z*)``."""
        want_jac = self.compute_jac_loss and torch.is_grad_enabled()
        want_res = self.compute_residual_loss and torch.is_grad_enabled()
        if not (want_jac or want_res or self.compute_spectral_radius):
            return
        if out.fz is not None and not self.eager_jacobian:
            fz, z_in = out.fz, out.z_in
        else:
            # A compiled f has no double backward: the Jacobian terms re-evaluate it eagerly.
            eager = (
                torch.compiler.set_stance("force_eager") if self.eager_jacobian else nullcontext()
            )
            with torch.enable_grad(), eager:
                z_in = out.z.detach().requires_grad_()
                fz = g(z_in)
        if want_jac:
            stats.jac_loss = jac_loss_estimate(fz, z_in, samples=self.jac_samples)
        if want_res:
            stats.residual_loss = self.residual_measure(spec.unflatten(fz), spec.unflatten(z_in))
        if self.compute_spectral_radius:
            with torch.enable_grad():
                stats.spectral_radius = spectral_radius(fz, z_in, self.spectral_radius_iters)


@contextmanager
def deq_override(module: nn.Module, **changes: object) -> Iterator[list[DEQ]]:
    """:meth:`DEQ.override` applied to every DEQ inside ``module`` (a task's model)."""
    deqs = [m for m in module.modules() if isinstance(m, DEQ)]
    with ExitStack() as stack:
        for d in deqs:
            stack.enter_context(d.override(**changes))
        yield deqs
