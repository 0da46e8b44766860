"""``train_hypersolver.py``: train a HyperAnderson solver for any trained run (thesis ch. 6).

Following Bai, Koltun & Kolter (ICLR 2022; ``docs/thesis.md`` §5): the DEQ is frozen; its
"ground-truth" fixed points z* come from a long, tight classic solve on training batches; the
solver's parameters are trained by backpropagation through K HyperAnderson steps with

* ``L_conv = sum_k w_k ||z^k - z*|| / ||z*||``, w_k increasing in k (here w_k ~ k, summing to 1);
* ``L_init = ||h(x) - z*|| / ||z*||`` on the initializer's output (the first iterate);
* ``L_alpha = mean_k ||G_k alpha_k|| / ||g_k||`` (the mixed residual Anderson's least squares
  minimises, so it pulls the weights toward Anderson's), with a weight that decays linearly to 0.

Before BPTT, the ``coordinate`` initializer is set to its closed-form least-squares fit of L_init
(a per-coordinate regression), which gradient steps at this learning rate would take hundreds of
steps to reach. Distances are relative to ||z*|| so that one weighting works for every model. The
appendix with the paper's exact weights was not retrieved (§5), so ours are stated as options.
The z* solve uses
100 steps as in the paper ("e.g. 100 Broyden steps"); K defaults to the run's forward budget (the
paper uses K = 12 on ImageNet). The problems are collected once; each training step draws one.
"""

from __future__ import annotations

import copy
import math
import random
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from deq_lightning.app.console import say
from deq_lightning.app.runs import Run, run_from
from deq_lightning.deq import DEQ, deq_override
from deq_lightning.deq.hyper import (
    HyperAndersonNet,
    Problem,
    capture_problems,
    hyper_solve,
    save_hypersolver,
    unroll,
)
from deq_lightning.deq.scope import forward_scope

WEIGHTS_FILE = "hyperanderson.pt"


@dataclass
class HyperTrainOptions:
    """The ``hyper:`` node of ``conf/train_hypersolver.yaml``."""

    steps: int = 300  # optimisation steps (one collected batch each)
    lr: float = 1e-3
    batches: int = 16  # training batches whose fixed points are collected
    holdout: int = 2  # of those, kept out of training to report the gain
    unroll: int | None = None  # K; None = the run's forward max_iter
    m: int = 9  # Anderson history, as the anderson solver's default
    lam: float = 1e-4
    beta: float = 1.0
    pool: int = 8  # bins of the pooled residual features
    hidden: int = 16  # width of the temporal conv
    init: str = "auto"  # coordinate | pointwise | auto (coordinate if the state size is fixed)
    init_weight: float = 1.0
    alpha_weight: float = 1.0
    alpha_decay: float = 0.5  # fraction of the steps over which alpha_weight decays to 0
    ref_solver: str = "anderson"
    ref_max_iter: int = 100
    ref_tol: float = 1e-5
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("steps", "batches", "m", "pool", "hidden", "ref_max_iter"):
            if getattr(self, key) < 1:
                raise ValueError(f"hyper.{key} must be >= 1, got {getattr(self, key)}")
        if not 0 <= self.holdout < self.batches:
            raise ValueError(f"hyper.holdout must be in [0, hyper.batches), got {self.holdout}")
        if self.init not in ("auto", "coordinate", "pointwise"):
            raise ValueError(f"hyper.init must be auto, coordinate or pointwise, got {self.init}")


# ----------------------------------------------------------------------------------------------
# Losses and the training loop (pure torch: tests call these on toy problems)
# ----------------------------------------------------------------------------------------------


def hyper_losses(
    net: HyperAndersonNet, p: Problem, steps: int, m: int, lam: float, beta: float
) -> dict[str, Tensor]:
    """``conv``, ``init`` and ``alpha`` losses of K = ``steps`` unrolled steps on one problem."""
    with forward_scope():
        run = unroll(net, p.f, p.x0, steps, m, lam, beta)
    ref = torch.linalg.vector_norm(p.z_star, dim=1) + 1e-9
    dists = [torch.linalg.vector_norm(z - p.z_star, dim=1) / ref for z in run.iterates]
    w = torch.arange(1, len(dists) + 1, dtype=p.x0.dtype, device=p.x0.device)
    w = w / w.sum()
    conv = sum(wk * d.mean() for wk, d in zip(w, dists))
    alpha = torch.stack(run.mixed_residual).mean()
    return {"conv": conv, "init": dists[0].mean(), "alpha": alpha}


def evaluate_losses(
    net: HyperAndersonNet, problems: list[Problem], steps: int, m: int, lam: float, beta: float
) -> dict[str, float]:
    """Mean losses over ``problems`` (no gradient)."""
    totals: dict[str, float] = {}
    with torch.no_grad():
        for p in problems:
            for k, v in hyper_losses(net, p, steps, m, lam, beta).items():
                totals[k] = totals.get(k, 0.0) + float(v) / len(problems)
    return totals


def fit(
    net: HyperAndersonNet,
    problems: list[Problem],
    opts: HyperTrainOptions,
    steps_k: int,
    log: Callable[[str], None] = print,
) -> list[float]:
    """Adam on the solver's parameters; returns the per-step total loss."""
    gen = random.Random(opts.seed)
    optim = torch.optim.Adam(net.parameters(), lr=opts.lr)
    decay_steps = max(1, int(opts.alpha_decay * opts.steps))
    history = []
    net.train()
    for step in range(opts.steps):
        p = problems[gen.randrange(len(problems))]
        parts = hyper_losses(net, p, steps_k, opts.m, opts.lam, opts.beta)
        w_alpha = opts.alpha_weight * max(0.0, 1 - step / decay_steps)
        loss = parts["conv"] + opts.init_weight * parts["init"] + w_alpha * parts["alpha"]
        if not torch.isfinite(loss):
            log(f"step {step}: non-finite loss, batch skipped")
            continue
        optim.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        optim.step()
        history.append(loss.item())
        parts = {k: v.detach() for k, v in parts.items()}
        if step % max(1, opts.steps // 10) == 0 or step == opts.steps - 1:
            log(
                f"step {step:4d}  loss {history[-1]:.4f}  conv {float(parts['conv']):.4f}  "
                f"init {float(parts['init']):.4f}  alpha {float(parts['alpha']):.4f}"
            )
    net.eval()
    return history


def fit_initializer(net: HyperAndersonNet, problems: list[Problem], beta: float) -> None:
    """Set the ``coordinate`` initializer to its least-squares optimum of L_init, in closed form.

    Per coordinate, ``z* - z1 ~ a u + b`` (z1 = Anderson's first iterate, u = f(z0)) is a
    one-variable regression over the collected samples; training then starts from it instead of
    spending its first hundreds of steps walking 2 x dim parameters away from zero.
    """
    if net.init != "coordinate":
        return
    us, rs = [], []
    with torch.no_grad(), forward_scope():
        for p in problems:
            u = p.f(p.x0)
            us.append(u)
            rs.append(p.z_star - (p.x0 + beta * (u - p.x0)))
    u, r = torch.cat(us).double(), torch.cat(rs).double()
    du, dr = u - u.mean(0), r - r.mean(0)
    var = du.pow(2).mean(0)
    scale = (du * dr).mean(0) / (var + 1e-6 * var.mean() + 1e-12)
    net.init_scale.data.copy_(scale)
    net.init_shift.data.copy_(r.mean(0) - scale * u.mean(0))


def without_mixer(net: HyperAndersonNet) -> HyperAndersonNet:
    """A copy whose mixing corrections are zero: the trained initializer with Anderson's mixing."""
    out = copy.deepcopy(net)
    with torch.no_grad():
        for head in (out.alpha_head, out.beta_head):
            head.weight.zero_()
            head.bias.zero_()
    return out


def residual_after(
    net: HyperAndersonNet | None,
    problems: list[Problem],
    steps: int,
    m: int,
    lam: float,
    beta: float,
) -> float:
    """Mean relative residual of the best iterate after ``steps`` evaluations."""
    res = []
    for p in problems:
        with forward_scope():
            out = hyper_solve(
                net, p.f, p.x0, max_iter=steps, tol=1e-12, stop_mode="rel",
                diverge_factor=1e3, m=m, lam=lam, beta=beta,
            )  # fmt: skip
        res.append(out.stats.rel_res.float().mean().item())
    return sum(res) / len(res)


# ----------------------------------------------------------------------------------------------
# A trained run: load it, collect its fixed points, train, save
# ----------------------------------------------------------------------------------------------


def frozen_task(run: Run) -> pl.LightningModule:
    """The run's trained task with its weights frozen; an error when it has no DEQ layer."""
    task = run.load_task()
    if task.model is None or not any(isinstance(m, DEQ) for m in task.model.modules()):
        raise ValueError(f"{run.ckpt} holds no DEQ layer: there is no solver to learn")
    return task.requires_grad_(False)


def collect_problems(
    task: pl.LightningModule,
    datamodule: pl.LightningDataModule,
    opts: HyperTrainOptions,
    split: str = "train",
) -> list[Problem]:
    """Fixed points of ``opts.batches`` batches of ``split``, from a long tight solve.

    The task's own evaluation step runs the batches (through a Trainer, so every task works
    unchanged) while :func:`capture_problems` records each DEQ call's f, z0 and solution.
    """
    datamodule.prepare_data()
    datamodule.setup("fit")
    loader = datamodule.train_dataloader() if split == "train" else datamodule.val_dataloader()
    ref = {"max_iter": opts.ref_max_iter, "tol": opts.ref_tol}
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        limit_val_batches=opts.batches,
        # The captured f closes over the batch's tensors (masks, memory); made under
        # inference_mode they could not enter the solver's training graph later.
        inference_mode=False,
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*(shuffl|num_workers|IterableDataset).*")
        with (
            deq_override(task.model, solver=opts.ref_solver, solver_opts=ref, eval_solver_opts=ref),
            capture_problems(task.model) as problems,
        ):
            trainer.validate(task, dataloaders=loader, verbose=False)
    task.eval()
    if not problems:
        raise RuntimeError("the task ran no DEQ solve on its training batches")
    return problems


def forward_budget(task: pl.LightningModule) -> dict:
    """The run's evaluation solver options (the budget a learned solver should beat)."""
    deq = next(m for m in task.model.modules() if isinstance(m, DEQ))
    return deq.active_solver_opts()


def train_for_run(cfg: DictConfig) -> Path:
    """The whole command: load, collect, train, report, save; returns the weights file."""
    opts = HyperTrainOptions(**OmegaConf.to_container(cfg.hyper, resolve=True))
    torch.manual_seed(opts.seed)
    run = run_from(cfg, "train_hypersolver.py", merge=False)
    task, datamodule, run_dir = frozen_task(run), run.datamodule(), run.run_dir
    budget = forward_budget(task)
    k = opts.unroll or budget["max_iter"]
    start = time.perf_counter()
    problems = collect_problems(task, datamodule, opts)
    dims = {p.x0.shape[1] for p in problems}
    init = opts.init if opts.init != "auto" else "coordinate" if len(dims) == 1 else "pointwise"
    say(
        f"collected {len(problems)} solves (state size {sorted(dims)}) with {opts.ref_solver} "
        f"x{opts.ref_max_iter} in {time.perf_counter() - start:.1f}s; training K={k} steps, "
        f"init={init}"
    )
    train_set = problems[: len(problems) - opts.holdout] if opts.holdout else problems
    held = problems[len(problems) - opts.holdout :] if opts.holdout else problems
    net = HyperAndersonNet(max(dims), m=opts.m, pool=opts.pool, hidden=opts.hidden, init=init)
    anderson_loss = evaluate_losses(net, held, k, opts.m, opts.lam, opts.beta)
    start = time.perf_counter()
    fit_initializer(net, train_set, opts.beta)
    fit(net, train_set, opts, k, log=lambda s: say(s))
    seconds = time.perf_counter() - start
    res_a = residual_after(None, held, k, opts.m, opts.lam, opts.beta)
    res_h = residual_after(net, held, k, opts.m, opts.lam, opts.beta)
    init_only = without_mixer(net)
    res_i = residual_after(init_only, held, k, opts.m, opts.lam, opts.beta)
    say(
        f"held-out relative residual after {k} evaluations: {res_a:.3g} (Anderson), "
        f"{res_h:.3g} (trained), {res_i:.3g} (trained initializer, Anderson's mixing)"
    )
    if res_i < res_h:  # model selection on held-out batches: the residual is what stops a solve
        say("keeping Anderson's mixing: the learned mixing did not lower the held-out residual")
        net, res_h = init_only, res_i
    trained_loss = evaluate_losses(net, held, k, opts.m, opts.lam, opts.beta)
    n_params = sum(p.numel() for p in net.parameters())
    n_model = sum(p.numel() for p in task.model.parameters())
    say(
        f"held-out: conv loss {anderson_loss['conv']:.4f} (Anderson) -> "
        f"{trained_loss['conv']:.4f}; relative residual after {k} evaluations "
        f"{res_a:.3g} (Anderson) -> {res_h:.3g}; {n_params} parameters "
        f"({100 * n_params / n_model:.1f}% of the model); trained in {seconds:.0f}s"
    )
    out = Path(cfg.out) if cfg.get("out") else run_dir / WEIGHTS_FILE
    meta = {
        "run_dir": str(run_dir),
        "options": {k_: v for k_, v in asdict(opts).items() if v is not None},
        "unroll": k,
        "heldout_conv_anderson": anderson_loss["conv"],
        "heldout_conv_trained": trained_loss["conv"],
        "heldout_rel_res_anderson": res_a,
        "heldout_rel_res_trained": res_h,
        "heldout_rel_res_init_only": res_i,
    }
    save_hypersolver(net, out, meta)
    say(f"saved {out} ({out.stat().st_size / 1024:.0f} KiB)")
    say("evaluate with: " + usage(run_dir, out, opts, budget))
    return out


def usage(run_dir: Path, out: Path, opts: HyperTrainOptions, budget: dict) -> str:
    """The eval command, with the run's own budget so the comparison is like for like."""
    args = [f"run_dir={run_dir}", "solver=hyperanderson", f"solver.path={out}"]
    args += [f"solver.{k}={budget[k]}" for k in ("max_iter", "tol", "stop_mode")]
    defaults = HyperTrainOptions()
    args += [f"solver.{k}={getattr(opts, k)}" for k in ("m", "lam", "beta")
             if not math.isclose(getattr(opts, k), getattr(defaults, k))]  # fmt: skip
    return "python eval.py " + " ".join(args)


def register_schema() -> None:
    """Type-check the ``hyper:`` node at composition (a typo fails with the key's name)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(group="schema", name="hyper_train", node=HyperTrainOptions)
