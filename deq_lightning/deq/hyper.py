"""HyperAnderson: Anderson acceleration steered by a small learned network (thesis ch. 6).

The neural DEQ solver of Bai, Koltun & Kolter (ICLR 2022; ``docs/thesis.md`` §5) has two parts,
both trained with the DEQ frozen (see :mod:`deq_lightning.app.hypersolver`):

* an **initializer** h(x) that predicts a better starting point than zeros;
* a **mixer**: a 2-layer temporal conv over pooled features of the last m residuals that predicts
  Anderson's mixing weights alpha (normalised to sum to 1) and the step size beta.

Two choices differ from the paper, so that one solver serves every model through the flat state:

* The solver only sees the flat ``(batch, dim)`` state and f, not the input injection. h therefore
  reads ``u = f(z0)`` -- the first evaluation every solver makes anyway, and a function of the
  injection alone when z0 = 0 -- and predicts a *correction* to Anderson's first iterate. The
  ``coordinate`` form is a per-coordinate affine map of u (2 x dim parameters; needs a fixed state
  size); the ``pointwise`` form is a tiny MLP shared by all coordinates (any state size, e.g. LMs
  evaluated at another sequence length).
* The mixer predicts a correction to the classic Anderson weights (still solved by least squares)
  and a multiplicative correction to the configured beta: ``alpha = alpha_AA + d - mean(d)`` and
  ``beta = beta_cfg * 2 sigmoid(b)``. With the network zeroed (as freshly built) both corrections
  vanish exactly and the solver *is* Anderson, so a trained solver can only start from Anderson's
  behaviour, and beta stays in (0, 2 beta_cfg) (the paper's (0, 1) when beta_cfg = 0.5).

Residual features are pooled over the flat state into ``pool`` bins (adaptive average pooling), a
shape-free stand-in for the paper's per-channel global pooling, and scaled by the newest residual's
norm so that the network sees the same inputs at every residual level.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kit import AndersonMixer, FlatFn, FlatResult, Monitor, Option, Recorder, Run
from .solvers import ANDERSON_OPTIONS, check_solver_options, register_solver, run_checked

FORMAT = "deq_lightning.hyperanderson/1"
INIT_KINDS = ("coordinate", "pointwise")
_EPS = 1e-12


class HyperAndersonNet(nn.Module):
    """The learned parts: initializer and mixer. Output layers start at zero (= Anderson)."""

    def __init__(
        self, dim: int, m: int = 9, pool: int = 8, hidden: int = 16, init: str = "coordinate"
    ) -> None:
        super().__init__()
        if init not in INIT_KINDS:
            raise ValueError(f"init must be one of {INIT_KINDS}, got {init!r}")
        self.config = {"dim": dim, "m": m, "pool": pool, "hidden": hidden, "init": init}
        self.dim, self.m, self.pool, self.init = dim, m, pool, init
        if init == "coordinate":
            self.init_scale = nn.Parameter(torch.zeros(dim))
            self.init_shift = nn.Parameter(torch.zeros(dim))
        else:
            self.init_mlp = nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        # Per history slot: pooled residual, log relative norm, Anderson's alpha, presence mask.
        # The paper's 2-layer temporal conv (kernel 3), written as Linear layers on each slot's
        # neighbourhood: on CPU, Conv1d on a (B, C, m) input this small costs ~0.4 ms a call.
        self.conv1 = nn.Linear(3 * (pool + 3), hidden)
        self.conv2 = nn.Linear(3 * hidden, hidden)
        self.alpha_head = nn.Linear(hidden, 1)
        self.beta_head = nn.Linear(hidden, 1)
        for head in (self.alpha_head, self.beta_head, *self._init_out()):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def mixes(self) -> bool:
        """Whether the mixing corrections can be non-zero (else the solver skips the mixer)."""
        heads = (self.alpha_head, self.beta_head)
        return any(bool(p.detach().abs().sum() > 0) for h in heads for p in h.parameters())

    def _init_out(self) -> list[nn.Module]:
        return [self.init_mlp[-1]] if self.init == "pointwise" else []

    def check_dim(self, dim: int, where: str = "") -> None:
        if self.init == "coordinate" and dim != self.dim:
            raise ValueError(
                f"hyperanderson weights{where} were trained for a DEQ state of {self.dim} values "
                f"per sample, but this DEQ's state has {dim}; train a solver for this model with "
                "train_hypersolver.py (or use init=pointwise for states whose size varies)"
            )

    def initial_correction(self, u: Tensor) -> Tensor:
        """Correction to Anderson's first iterate, from u = f(z0)."""
        if self.init == "coordinate":
            return u * self.init_scale + self.init_shift
        scale = u.pow(2).mean(1, keepdim=True).sqrt() + _EPS
        return scale * self.init_mlp((u / scale)[..., None]).squeeze(-1)

    def pooled(self, g: Tensor) -> Tensor:
        """A residual's per-sample features: ``pool`` bin means (B, pool)."""
        return F.adaptive_avg_pool1d(g[:, None, :], self.pool).squeeze(1)

    def mix(self, feats: Tensor, norms: Tensor, alpha: Tensor, n: int) -> tuple[Tensor, Tensor]:
        """Corrections ``(d_alpha (B, n), beta_logit (B,))`` from the n slots in age order.

        ``feats`` (B, n, pool) and ``norms`` (B, n) are the slots' pooled residuals and norms,
        newest last; ``alpha`` (B, n) is Anderson's weights in the same order.
        """
        b = feats.shape[0]
        newest = norms[:, -1:].clamp_min(_EPS)
        x = torch.cat(
            [
                feats / newest[..., None] * self.pool**0.5,
                torch.log(norms.clamp_min(_EPS) / newest)[..., None].clamp(-20, 20),
                alpha[..., None],
                torch.ones_like(alpha)[..., None],
            ],
            dim=2,
        )
        x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        pad = self.m - n
        if pad > 0:  # left-pad: the newest slot always sits at position m - 1
            x = torch.cat([x.new_zeros(b, pad, x.shape[2]), x], dim=1)
        h = F.gelu(self.conv1(_neighbourhood(x)))
        h = F.gelu(self.conv2(_neighbourhood(h)))  # (B, m, hidden)
        d_alpha = self.alpha_head(h[:, pad:]).squeeze(2)
        beta_logit = self.beta_head(h[:, pad:].mean(1)).squeeze(1)
        return d_alpha, beta_logit


def _neighbourhood(x: Tensor) -> Tensor:
    """(B, m, C) -> (B, m, 3C): each slot with its zero-padded neighbours (a kernel-3 window)."""
    p = F.pad(x, (0, 0, 1, 1))
    return torch.cat([p[:, :-2], p[:, 1:-1], p[:, 2:]], dim=2)


def mixing_weights(alpha: Tensor, d_alpha: Tensor) -> Tensor:
    """The paper's normalisation ``w + (1 - sum w) / n`` of ``w = alpha + d_alpha``.

    Anderson's alpha already sums to 1, so this is ``alpha + d_alpha - mean(d_alpha)``, written so
    that a zero correction leaves Anderson's weights bit for bit.
    """
    return alpha + (d_alpha - d_alpha.mean(1, keepdim=True))


# ----------------------------------------------------------------------------------------------
# The iteration (shared by the solver and by training)
# ----------------------------------------------------------------------------------------------


class _History:
    """The last m iterates and residuals, in ring slots.

    With ``grad`` the slots are a list that is stacked per step (autograd cannot differentiate
    through the in-place ring buffers Anderson uses); without, they are buffers written in place.
    """

    def __init__(self, x0: Tensor, m: int, grad: bool) -> None:
        b, d = x0.shape
        self.grad = grad
        if grad:
            self.xs: list[Tensor | None] = [None] * m
            self.gs: list[Tensor | None] = [None] * m
        else:
            self.xbuf = x0.new_empty(b, m, d)
            self.gbuf = x0.new_empty(b, m, d)

    def put(self, slot: int, x: Tensor, g: Tensor) -> None:
        if self.grad:
            self.xs[slot], self.gs[slot] = x, g
        else:
            self.xbuf[:, slot].copy_(x)
            if g.data_ptr() != self.gbuf[:, slot].data_ptr():
                self.gbuf[:, slot].copy_(g)

    def stacked(self, n: int) -> tuple[Tensor, Tensor]:
        if self.grad:
            return torch.stack(self.xs[:n], 1), torch.stack(self.gs[:n], 1)
        return self.xbuf[:, :n], self.gbuf[:, :n]


def _roll(t: Tensor, shift: int) -> Tensor:
    return torch.roll(t, shift, 1) if shift else t


@dataclass
class Unroll:
    """What training needs from K steps: the iterates and each step's mixed-residual norm ratio."""

    iterates: list[Tensor]  # x^1 .. x^K (x^1 is the initializer's output)
    mixed_residual: list[Tensor]  # ||sum_i alpha_i g_i|| / ||g_k|| per step, (B,) each


def _iterate(
    net: HyperAndersonNet | None,
    f: FlatFn,
    x0: Tensor,
    steps: int,
    m: int,
    lam: float,
    beta: float,
    mon: Monitor | None = None,
    rec: Recorder | None = None,
    mix: bool = True,
) -> tuple[int, int, Unroll]:
    """Run up to ``steps`` evaluations; returns ``(nfe, fallbacks, unroll)``.

    With a monitor this is the solver (in-place buffers, samples freeze as they converge);
    without one it is the out-of-place K-step unroll that training differentiates through.
    ``mix=False`` skips the mixer (its corrections are known to be zero).
    """
    grad = mon is None
    b = x0.shape[0]
    hist = _History(x0, m, grad)
    feats = x0.new_zeros(b, m, net.pool if net is not None else 1)
    norms = x0.new_zeros(b, m)
    mixer = AndersonMixer(x0, m, lam)
    steer = net is not None and mix
    out = Unroll([], [])
    x = x0 if grad else x0.clone()
    k = 0
    for k in range(steps):
        if rec is not None:
            rec(k, x)
        fx = f(x) if mon is None else mon.evaluate(f, x)
        slot, n = k % m, min(k + 1, m)
        g = fx - x if grad else torch.sub(fx, x, out=hist.gbuf[:, slot])
        if mon is not None:
            if not mon.observe(k, x, fx, g):
                break
            if mon.keep is not None:  # batch compaction: drop stopped rows
                x, fx, feats, norms = mon.shrink(x, fx, feats, norms)
                hist.xbuf, hist.gbuf = mon.shrink(hist.xbuf, hist.gbuf)
                mixer.shrink(mon)
                g = hist.gbuf[:, slot]
        hist.put(slot, x, g)
        xs, gs = hist.stacked(n)
        gd = g.detach()
        with torch.no_grad():
            alpha, bad = mixer.weights(gs.detach(), gd, slot)
        step_beta: Tensor | float = beta
        if steer:
            alpha, step_beta = _steer(net, feats, norms, alpha, bad, gd, slot, beta)
        # x_next = sum_i alpha_i (x_i + beta g_i), as Anderson writes it.
        a = alpha[:, None]  # (B, 1, n)
        if grad:
            mixed_g = torch.bmm(a, gs)
            x = (torch.bmm(a, xs) + step_beta * mixed_g).squeeze(1)
            out.mixed_residual.append(
                torch.linalg.vector_norm(mixed_g.squeeze(1), dim=1)
                / (torch.linalg.vector_norm(gd, dim=1) + _EPS)
            )
        else:
            coef, scalar = (a * step_beta, 1.0) if steer else (a, beta)
            x = torch.bmm(a, xs).baddbmm_(coef, gs, alpha=scalar).squeeze(1)
        if k == 0 and net is not None:
            corr = net.initial_correction(fx if grad else fx.detach())
            x = x + corr if grad else x.add_(torch.nan_to_num(corr, nan=0.0))
        if mon is None:
            out.iterates.append(x)
        else:
            x = mon.hold(x)
    return k + 1, mixer.fallbacks, out


def _steer(
    net: HyperAndersonNet,
    feats: Tensor,
    norms: Tensor,
    alpha: Tensor,
    bad: Tensor,
    gd: Tensor,
    slot: int,
    beta: float,
) -> tuple[Tensor, Tensor]:
    """The network's mixing weights and step size ``(alpha, beta (B, 1, 1))`` for this step.

    Records the newest residual's features in ring ``slot`` first; samples whose Anderson solve
    fell back, or whose corrections are not finite, keep Anderson's alpha and the given beta.
    """
    m, n = feats.shape[1], alpha.shape[1]
    with torch.no_grad():
        feats[:, slot] = net.pooled(gd)
        norms[:, slot] = torch.linalg.vector_norm(gd, dim=1)
    # Age order (oldest first): a roll of the ring once it is full.
    shift = (slot + 1) % m if n == m else 0
    d_age, beta_logit = net.mix(
        _roll(feats[:, :n], -shift), _roll(norms[:, :n], -shift), _roll(alpha, -shift), n
    )
    mixed = mixing_weights(alpha, _roll(d_age, shift))
    ok = ~bad[:, None] & torch.isfinite(mixed).all(1, keepdim=True)
    step_beta = beta * 2 * torch.sigmoid(beta_logit)
    step_beta = torch.where(ok[:, 0] & torch.isfinite(step_beta), step_beta, beta)
    return torch.where(ok, mixed, alpha), step_beta[:, None, None]


def unroll(
    net: HyperAndersonNet, f: FlatFn, x0: Tensor, steps: int, m: int, lam: float, beta: float
) -> Unroll:
    """K differentiable HyperAnderson steps from x0 (for training; f's parameters frozen)."""
    net.check_dim(x0.shape[1])
    return _iterate(net, f, x0, steps, m, lam, beta)[2]


def _solve(
    net: HyperAndersonNet | None, name: str, f: FlatFn, x0: Tensor, run: Run, **anderson: float
) -> FlatResult:
    """The solve itself, in the :class:`~.kit.Run` set up by :func:`~.solvers.run_checked`."""
    mix = net is not None and net.mixes()
    m, lam, beta = anderson["m"], anderson["lam"], anderson["beta"]
    nfe, fallbacks, _ = _iterate(net, f, x0, run.max_iter, m, lam, beta, run.mon, run.rec, mix)
    return run.result(name, nfe, fallbacks)


def hyper_solve(
    net: HyperAndersonNet | None,
    f: FlatFn,
    x0: Tensor,
    record: Sequence[int] | None = None,
    name: str = "hyperanderson",
    **opts: object,
) -> FlatResult:
    """The solver with an in-memory network (``None`` = plain Anderson through the same code).

    ``opts`` are Anderson's options (validated, with its defaults); ``compact`` is "off" unless
    given, as training's problems are solved whole.
    """
    if net is not None:
        net.check_dim(x0.shape[1])
    full = check_solver_options("anderson", {"compact": "off", **opts})
    return run_checked(partial(_solve, net, name), f, x0, full, record)


# ----------------------------------------------------------------------------------------------
# The file and the registered solver
# ----------------------------------------------------------------------------------------------


def save_hypersolver(net: HyperAndersonNet, path: str | Path, meta: dict | None = None) -> Path:
    """Write the weights and the config that rebuilds them (loadable with weights_only=True)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().float() for k, v in net.state_dict().items()}
    torch.save({"format": FORMAT, "config": dict(net.config), "state_dict": state,
                "meta": dict(meta or {})}, path)  # fmt: skip
    return path


def load_hypersolver(path: str | Path) -> tuple[HyperAndersonNet, dict]:
    """Rebuild a saved solver on CPU; errors name the file and how to make a good one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"hyperanderson weights not found: {path}; write them with "
            "`python train_hypersolver.py run_dir=<training run>` and pass solver.path=<file>"
        )
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors come in many types
        raise ValueError(f"{path} is not a hyperanderson weights file: {e}") from None
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise ValueError(
            f"{path} is not a hyperanderson weights file (expected format {FORMAT!r}); "
            "write one with train_hypersolver.py"
        )
    net = HyperAndersonNet(**blob["config"])
    net.load_state_dict(blob["state_dict"])
    return net.eval().requires_grad_(False), dict(blob.get("meta") or {})


_CACHE: dict[tuple, HyperAndersonNet] = {}


def _cached(path: str, device: torch.device, dtype: torch.dtype) -> HyperAndersonNet:
    """Load once per file version and device: a solve must not re-read the file every batch."""
    st = os.stat(path) if os.path.isfile(path) else None
    key = (os.path.realpath(path), st and st.st_mtime_ns, st and st.st_size, str(device), dtype)
    if key not in _CACHE:
        net, _ = load_hypersolver(path)
        _CACHE.clear()  # one model's solver at a time; a retrained file replaces the old one
        _CACHE[key] = net.to(device=device, dtype=dtype)
    return _CACHE[key]


def _check_path(key: str, v: object) -> None:
    if not isinstance(v, (str, os.PathLike)) or not str(v):
        raise ValueError(
            f"{key} must be the weights file written by train_hypersolver.py "
            f"(solver.path=<run_dir>/hyperanderson.pt), got {v!r}"
        )
    if not os.path.isfile(v):
        raise ValueError(
            f"{key}={v} does not exist; write it with `python train_hypersolver.py run_dir=<run>`"
        )


@register_solver("hyperanderson", path=Option(None, str | None, _check_path), **ANDERSON_OPTIONS)
def hyperanderson(f: FlatFn, x0: Tensor, run: Run, path: str, **anderson: float) -> FlatResult:
    """Anderson (same ``m``, ``lam``, ``beta`` as :func:`~.solvers.anderson`) steered by the
    network saved at ``path`` by ``train_hypersolver.py``; the file's ``m`` must match."""
    net = _cached(str(path), x0.device, x0.dtype)
    if net.m != anderson["m"]:
        raise ValueError(
            f"{path} was trained with history m={net.m}, but the solver has m={anderson['m']}; "
            f"set solver.m={net.m}"
        )
    net.check_dim(x0.shape[1], f" in {path}")
    return _solve(net, "hyperanderson", f, x0, run, **anderson)


# ----------------------------------------------------------------------------------------------
# Reading the problems a model's DEQ layers solve
# ----------------------------------------------------------------------------------------------


@dataclass
class Problem:
    """One solve of a DEQ layer: its flat f (a closure over the batch's injection), z0 and z*."""

    f: FlatFn
    x0: Tensor
    z_star: Tensor


@contextmanager
def capture_problems(module: nn.Module) -> Iterator[list[Problem]]:
    """Record every forward solve of every DEQ inside ``module`` (with the solution it found)."""
    from .layer import DEQ

    found: list[Problem] = []
    deqs = [m for m in module.modules() if isinstance(m, DEQ)]
    if not deqs:
        raise ValueError(f"{type(module).__name__} has no DEQ layer to train a hypersolver for")

    def sink(f: FlatFn, x0: Tensor, z: Tensor) -> None:
        found.append(Problem(f, x0.detach().clone(), z.detach().clone()))

    for d in deqs:
        d.on_solve = sink
    try:
        yield found
    finally:
        for d in deqs:
            d.on_solve = None
