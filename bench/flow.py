"""Flow benchmark: DEQ-Flow against the same update operator unrolled as RAFT does.

    OMP_NUM_THREADS=1 python bench/flow.py                 # the flow_tiny model, 64x64, ~3 min
    OMP_NUM_THREADS=2 python bench/flow.py --train --threads 2   # + the flow_tiny training target
    python bench/flow.py --experiment deq_flow_B_chairs --size 368 496 --batch 6 --steps 12 24 \
        --device cuda

Prints Markdown. Both sides are one DEQFlow (the model of ``--experiment``), the same frame
pairs, the same L1 flow loss on the final flow and the same AdamW step; only the way the
equilibrium is reached and differentiated differs:

* **DEQ** (``--backward phantom``, the thesis's default, or ``implicit``): the experiment's
  solver runs exactly N iterations without gradient (tolerance out of reach), then the phantom
  gradient backpropagates through ``backward.steps`` damped steps, or the implicit backward
  solves the adjoint (at most N iterations): memory does not grow with N;
* **unrolled**: f applied N times from zero, backpropagated through every application
  (``backward=unrolled, steps=N``): RAFT's recurrent refinement with N iterations, whose
  activation memory grows linearly with N. (RAFT also supervises every iteration; the final one
  alone is supervised here on both sides, which favours the unrolled side a little.)

Throughput is training pairs per second (median step over ``--repeats`` steps after one warm-up
step). Peak memory is that of one training step above the memory in use after set-up, in one
fresh process per run (``bench/_common.peak_memory_mib``). ``--train`` also runs ``train.py
experiment=flow_tiny`` and reports its wall time, test EPE and the zero-flow EPE (the target:
EPE <= 0.5 x zero-flow EPE in <= 10 minutes on 2 CPU cores).

Side by side with RAFT, trained (``--peer``) and ablated (``--ablate``)::

    OMP_NUM_THREADS=1 python bench/flow.py --peer raft_small --train-steps 400
    OMP_NUM_THREADS=1 python bench/flow.py --ablate context_init jacobian --train-steps 200
    python bench/flow.py --peer raft_small --quick          # a smoke run of a few steps

``--peer`` trains ``experiment=flow_tiny``'s DEQ-Flow, and for each peer (torchvision's RAFT,
``model=raft_small`` / ``raft_large``, randomly initialised, RAFT's sequence loss over its
iterations, the DEQ's correlation levels, RAFT's own 12 training iterations and the DEQ's
evaluation budget) the DEQ-Flow of its size (``MATCHING_DEQ``: ``deq_flow_tiny_wide`` beside
RAFT-small, ``deq_flow_B`` beside RAFT-large) and the peer itself, each through ``train.py`` in a
fresh process, on the same DataModule, crops, augmentation, batches (``task.train_seed``; checked
with ``train/data_checksum``), steps, optimizer, schedule and seed. ``--train-steps`` shortens
the schedule (the one-cycle schedule then spans those steps). ``--ablate`` trains DEQ-Flow
variants (what each ingredient is worth) on the same stream. Each DEQ side is re-scored on the
test pairs at four solver budgets (``eval_budgets``: does its estimate hold as the solve goes
on?). Both write ``<out>/results.json``, ``report.md`` and ``learning_curve.png`` (``--ablate``
alone: ``ablation.json``, ``.md``, ``.png``; ``--seed N`` other than 0 adds ``_seed<N>`` to each
name, so that seeds run side by side keep their own), the curve (validation EPE over the zero
flow's, from the runs' CSV logs); runs are kept under
``bench/results/flow_runs/<peer|ablation>[_seed<N>]`` (ignored).

Real photographs: after training, each side's model (``deq_lightning.load`` of its run: the
best-validation checkpoint) predicts the flow of the Middlebury 2014 Motorcycle stereo pair that
ships with scikit-image (:mod:`deq_lightning.datamodules.flow_real`: flow = (-disparity, 0)),
its frames downscaled by each of ``--real-scales`` (default 0.25, 125x185, whose mean motion,
8.9 px, is near the training pairs'; 0.5, 250x370, twice that). Each row's ``real`` holds, per
scale, ``real_epe`` (over the pixels with known disparity), ``real_epe_zero`` (the zero flow's on
the same pixels), ``real_epe_vs_zero`` and ``real_converged`` (the DEQ's fraction at its fixed
point; ``None`` for RAFT).

Prediction memory on photographs (what ``predict_flow.py max_side=... tile=...`` costs)::

    OMP_NUM_THREADS=1 python bench/flow.py --predict-memory   # ~5 min: predict_memory.json

times and measures the peak memory (``bench/_common.peak_memory_mib``: resident set above the
set-up, in a fresh process) of predicting one pair with the ``--experiment``'s architecture (random
weights: the cost does not depend on them) through ``flow_frames.solve_within``: the 500x741
Motorcycle pair as is, at ``max_side=256`` and in tiles of 256 (``tile_batch=null``, 1 on a CPU,
and 8), that pair upscaled 6x (3000x4446, 13 megapixels) at ``max_side=512``, and upscaled 2x
(1000x1482) at full resolution in tiles of 512. (The 13-megapixel pair in tiles of 512 is 96
tiles, about 2.5 minutes a call at one thread, too long for the five calls a row takes.)
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import statistics
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from _common import (
    count_params,
    fmt,
    git_commit,
    history,
    markdown_table,
    peak_memory_mib,
    run_train,
    step_peak_mib,
    timed,
    train_target,
)
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from readme import real_flow_cell

import deq_lightning
from deq_lightning.app.flow_frames import (
    Tiling,
    check_frame_size,
    correlation_bytes,
    plan_tiling,
    solve_within,
    tile_options,
)
from deq_lightning.app.inference import FlowEstimator, NotAtEquilibriumWarning
from deq_lightning.config import build_model, plain, register_schemas
from deq_lightning.datamodules.flow_real import MOTORCYCLE_SOURCE, motorcycle_pair
from deq_lightning.deq import deq_override
from deq_lightning.metrics.flow import epe_map

ROOT = Path(__file__).resolve().parents[1]
SEED = 0
MODES = ("deq", "unrolled")
REAL_SCALES = (0.25, 0.5)  # of the 500x741 Motorcycle pair (--real-scales)


def train_config(experiment: str, backward: str) -> DictConfig:
    """``train.py experiment=<experiment> backward=<backward>``'s composed config."""
    register_schemas()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "train",
            overrides=[
                f"experiment={experiment}",
                f"backward={backward}",
                "backward.extra_ok=true",  # the experiment's phantom keys, unused by implicit
                "hydra.runtime.output_dir=/tmp",
            ],
            return_hydra_config=False,
        )


def model_config(experiment: str, backward: str) -> tuple[dict, dict, dict]:
    cfg = train_config(experiment, backward)
    model = {**plain(cfg.model), "n_states": 1}
    return model, plain(cfg.solver), plain(cfg.backward)


def prepare_step(
    experiment: str,
    backward: str,
    mode: str,
    n: int,
    batch: int,
    size: tuple[int, int],
    device: str,
) -> callable:
    """One training step of ``mode`` ("deq" / "unrolled") with N = ``n``, ready to run."""
    model_cfg, solver, backward_cfg = model_config(experiment, backward)
    torch.manual_seed(SEED)
    dev = torch.device(device)
    model = build_model(model_cfg, solver, backward_cfg).to(dev).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(SEED)
    image1 = (255 * torch.rand(batch, 3, *size, generator=g)).to(dev)
    image2 = image1.roll(shifts=(1, 2), dims=(-2, -1))
    target = torch.zeros(batch, 2, *size, device=dev)
    target[:, 0], target[:, 1] = -2.0, -1.0
    if mode == "deq":
        changes = {"solver_opts": {"max_iter": n, "tol": 1e-30}}
        if backward == "implicit":
            changes["backward_opts"] = {"max_iter": n}
    else:
        changes = {"backward": "unrolled", "backward_opts": {"steps": n}}

    def go() -> None:
        with deq_override(model, **changes):
            out, _ = model(image1, image2)
        (out["flow"] - target).abs().mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return go


def throughput(args: argparse.Namespace, mode: str, n: int) -> float:
    """Training pairs per second (median step)."""
    go = prepare_step(
        args.experiment, args.backward, mode, n, args.batch, tuple(args.size), args.device
    )
    go()  # warm-up
    times, _ = timed(go, torch.device(args.device), args.repeats, budget_s=args.budget)
    return args.batch / statistics.median(times)


# ----------------------------------------------------------------------------------------------
# Trained side by side: --peer and --ablate
# ----------------------------------------------------------------------------------------------

# DEQ-Flow variants for --ablate: name -> overrides of experiment=flow_tiny.
ABLATIONS: dict[str, list[str]] = {
    "zero_init": ["model.hidden_init=zero"],  # the thesis's start (flow_tiny's before the fix)
    "context_init": ["model.hidden_init=context"],
    "jacobian": ["task.jac_loss_weight=0.5", "task.jac_loss_freq=0.5"],
    # The Jacobian term sees the flow's dependence on itself only with all_grad.
    "all_grad+jacobian": [
        "model.all_grad=true",
        "task.jac_loss_weight=0.5",
        "task.jac_loss_freq=0.5",
    ],
    "hidden_96": ["model.hidden_dim=96"],
    # RAFT-small's motion-encoder and flow-head widths (SIZES["tiny_wide"]), hidden width kept.
    "wide_update": ["model.size=tiny_wide"],
    "budget_24": ["solver.max_iter=24"],
    # Supervise states twice as deep, the evaluation budget still twice the training one.
    "budget_24_eval_48": ["solver.max_iter=24", "solver.eval_opts.max_iter=48"],
    "damped_0.5": ["solver.damping=0.5"],
    "context_init+jacobian": [
        "model.hidden_init=context",
        "task.jac_loss_weight=0.5",
        "task.jac_loss_freq=0.5",
    ],
    # The residual term (docs/equilibrium.md): off, or at a weight from the start of the run.
    "no_residual": ["task.residual_loss_weight=0"],
    "residual_0.1": ["task.residual_loss_weight=0.1", "task.residual_loss_start=0"],
    "residual_0.6": ["task.residual_loss_weight=0.6", "task.residual_loss_start=0"],
    "residual_1": ["task.residual_loss_weight=1", "task.residual_loss_start=0"],
    "residual_1_late": ["task.residual_loss_weight=1", "task.residual_loss_start=0.5"],
    # The thesis's shallow unrolled pre-training over the first half of the run, f applied as
    # often as flow_tiny's training solve iterates (solver.max_iter: 6).
    "pretrain_half": ["task.pretrain_steps=0.5", "task.pretrain_unroll=6"],
}
# --quick: the whole pipeline on a few batches (a smoke test, not a measurement).
QUICK = [
    "trainer.max_steps=2",
    "trainer.val_check_interval=1",
    "trainer.log_every_n_steps=1",
    "data.batch_size=4",
    "data.val_size=8",
    "data.test_size=8",
    "+trainer.limit_val_batches=2",
    "+trainer.limit_test_batches=2",
    "callbacks.flow_images=null",
]
SCORES = ("epe", "epe_zero", "1px", "3px", "5px")
# What --peer and --ablate write under --out: (results, report, learning-curve plot).
OUTPUTS = {
    "peer": ("results.json", "report.md", "learning_curve.png"),
    "ablation": ("ablation.json", "ablation.md", "ablation.png"),
}


def seed_suffix(seed: int) -> str:
    """What a seed other than 0 adds to the names of its outputs and runs (``_seed<N>``), so that
    seeds run side by side keep their own (a single seed's ranking can be the seed's)."""
    return "" if seed == 0 else f"_seed{seed}"


def output_names(kind: str, seed: int) -> tuple[str, str, str]:
    """OUTPUTS[kind], with :func:`seed_suffix` before each file's extension."""
    return tuple(f"{Path(n).stem}{seed_suffix(seed)}{Path(n).suffix}" for n in OUTPUTS[kind])


def base_overrides(args: argparse.Namespace) -> list[str]:
    """The overrides every side shares: the same experiment, seed, steps and evaluation."""
    out = [f"experiment={args.experiment}", f"seed={args.seed}"]
    if args.quick:
        return [*out, *QUICK]
    if args.train_steps:
        every = max(1, args.train_steps // args.val_points)
        out += [f"trainer.max_steps={args.train_steps}", f"trainer.val_check_interval={every}"]
    return out


# The DEQ-Flow of each peer's size, trained beside it (--peer): beside RAFT-small, flow_tiny's
# DEQ with an update block as wide as RAFT-small's (SIZES["tiny_wide"], 0.94M parameters against
# RAFT-small's 0.99M; before 8692efd it was RAFT-small's blocks as a DEQ, model=deq_flow_small,
# 1.08M: reports/flow/small_peer/); RAFT-large's update operator is DEQ-Flow-B's (the thesis's
# comparison). Both take the residual term over the second half of the
# run, as flow_tiny's full schedule does (from step 1500 of 3000), which a short schedule would
# otherwise never reach, and deq-flow's undamped phantom step (its default --tau 1.0). The
# experiment's own DEQ (the `deq_flow` row) keeps its settings.
MATCHING_TRAINING = ["task.residual_loss_start=0.5", "backward.tau=1.0"]
MATCHING_DEQ: dict[str, tuple[str, list[str]]] = {
    "raft_small": ("deq_flow_tiny_wide", ["model.size=tiny_wide", *MATCHING_TRAINING]),
    "raft_large": ("deq_flow_B", ["model.size=B", *MATCHING_TRAINING]),
}


def peer_overrides(peer: str, experiment: str) -> list[str]:
    """``model=<peer>`` with the DEQ's correlation levels and its evaluation budget as RAFT's
    evaluation iterations (derived from the experiment, not copied). RAFT trains with its own
    iteration count (the model config's ``num_iters``, RAFT's 12): the DEQ's training solve is a
    no-grad budget, not a number of backpropagated steps, so copying it would not match RAFT."""
    model, solver, _ = model_config(experiment, "phantom")
    eval_iters = (solver.get("eval_opts") or {}).get("max_iter", solver["max_iter"])
    return [
        f"model={peer}",
        f"model.corr_levels={model['corr_levels']}",
        f"model.eval_iters={eval_iters}",
    ]


def train_side(name: str, overrides: list[str], runs: Path, args: argparse.Namespace) -> dict:
    """One side through train.py (bench/_common.run_train): scores, solver health, costs."""
    run_dir = runs / name
    if run_dir.exists():
        shutil.rmtree(run_dir)
        (run_dir.parent / f"{name}.log").unlink(missing_ok=True)
    print(f"[flow] {name}: train.py {' '.join(overrides)}", file=sys.stderr, flush=True)
    res = run_train(overrides, run_dir, args.threads)
    m, hist = res["metrics"], history(run_dir)
    model = deq_lightning.load(run_dir)  # the best-validation checkpoint, scored twice below
    checksum = hist.get("train/data_checksum") or _step_series(run_dir, "train/data_checksum")
    row = {
        "name": name,
        "overrides": overrides,
        **{f"{stage}/{k}": m.get(f"{stage}/{k}") for stage in ("val", "test") for k in SCORES},
        "params": count_params(run_dir),
        "converged_fraction": m.get("test/fwd_converged"),
        "residual_p50": m.get("test/fwd_res_p50"),
        "solver_steps": m.get("test/fwd_steps"),
        "cpu_s": res["cpu_s"],
        "wall_s": res["wall_s"],
        "max_rss_mib": res["max_rss_mib"],
        "step_peak_mib": step_peak_mib(run_dir, args.threads),
        "data_checksum": checksum[-1][1] if checksum else None,
        "history": {
            k: hist.get(k, [])
            for k in ("val/epe", "val/epe_zero", "val/fwd_converged", "val/fwd_res_p50")
        },
        "real": real_scores(model, args.real_scales),
    }
    if row["converged_fraction"] is not None:  # a DEQ: does its estimate hold as it solves on?
        row["eval_budgets"] = eval_budgets(model)
    for stage in ("val", "test"):
        epe, zero = row[f"{stage}/epe"], row[f"{stage}/epe_zero"]
        row[f"{stage}/epe_vs_zero"] = epe / zero if epe is not None and zero else None
    print(f"[flow] {name}: test/epe {row['test/epe']}", file=sys.stderr, flush=True)
    return row


def real_scores(model: FlowEstimator, scales: Sequence[float]) -> list[dict]:
    """A trained model on the Motorcycle pair (real photographs) at each of ``scales``."""
    scores = []
    for scale in scales:
        pair = motorcycle_pair(scale)
        with warnings.catch_warnings():  # its converged fraction is recorded instead
            warnings.simplefilter("ignore", NotAtEquilibriumWarning)
            flow = model.predict(pair.image1, pair.image2)
        epe, zero = pair.epe(flow)
        scores.append(
            {
                "scale": scale,
                "size": list(pair.valid.shape),
                "valid_fraction": float(pair.valid.float().mean()),
                "real_epe": epe,
                "real_epe_zero": zero,
                "real_epe_vs_zero": epe / zero,
                "real_converged": model.converged,
            }
        )
    return scores


def _step_series(run_dir: Path, key: str) -> list[tuple[int, float]]:
    """A step-level metric's (step, value) pairs from the CSV log (history keeps epoch ones)."""
    import csv

    out = []
    for path in sorted(run_dir.glob("csv/**/metrics.csv")):
        with open(path, newline="") as fh:
            out += [(int(r["step"]), float(r[key])) for r in csv.DictReader(fh) if r.get(key)]
    return out


def plot_curves(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4), dpi=100)
    for row in rows:
        epe, zero = row["history"]["val/epe"], dict(row["history"]["val/epe_zero"])
        pts = [(s, v / zero[s]) for s, v in epe if zero.get(s)]
        if pts:
            ax.plot(*zip(*pts), marker="o", ms=3, label=row["name"])
    ax.axhline(1.0, color="grey", lw=0.8, ls=":", label="zero flow")
    ax.axhline(0.5, color="grey", lw=0.8, ls="--", label="target 0.5x")
    ax.set(xlabel="training step", ylabel="val EPE / zero-flow EPE", title=title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def side_overrides(
    args: argparse.Namespace, peers: Sequence[str], ablations: Sequence[str]
) -> dict[str, list[str]]:
    """Each side's name and train.py overrides: the experiment's DEQ (``deq_flow``), each peer
    after the DEQ of its size, then each ablation (``deq_flow+<name>``)."""
    base = base_overrides(args)
    sides = {"deq_flow": base}
    for peer in peers:
        name, overrides = MATCHING_DEQ[peer]
        sides[name] = [*base, *overrides]
        sides[peer] = [*base, *peer_overrides(peer, args.experiment)]
    sides.update({f"deq_flow+{k}": [*base, *ABLATIONS[k]] for k in ablations})
    return sides


def run_sides(args: argparse.Namespace) -> None:
    """--peer / --ablate: train every side; after each, write results.json, report.md and the
    plot with the sides trained so far (``"complete": false`` until the last), so that a crash
    or a kill in a later side loses nothing already measured."""
    load0 = os.getloadavg()
    sides = side_overrides(args, args.peer or [], args.ablate or [])
    kind = "ablation" if args.ablate and not args.peer else "peer"
    cmd = f"OMP_NUM_THREADS={args.threads} python bench/flow.py {' '.join(sys.argv[1:])}".strip()
    commit = git_commit()  # per row: rows kept from earlier runs keep their own
    rows: list[dict] = []
    for name, overrides in sides.items():
        row = train_side(name, overrides, args.runs / f"{kind}{seed_suffix(args.seed)}", args)
        row["command"], row["commit"] = cmd, commit
        rows.append(row)
        write_sides(args, kind, cmd, rows, load0, complete=len(rows) == len(sides))


def write_sides(
    args: argparse.Namespace,
    kind: str,
    cmd: str,
    rows: list[dict],
    load0: Sequence[float],
    complete: bool,
) -> None:
    """The JSON, report and plot of ``rows`` (the DEQ first), with the rows an earlier call kept."""
    for row in rows:
        # The Jacobian term's random projections draw from the generator the pairs come from.
        row["same_pairs_as_deq_flow"] = row["data_checksum"] == rows[0]["data_checksum"]
    json_name, md_name, png_name = output_names(kind, args.seed)
    rows = rows[:1] + kept_rows(args.out / json_name, rows, args) + rows[1:]
    sums = {r["data_checksum"] for r in rows if r["data_checksum"] is not None}
    result = {
        "command": cmd,
        "kind": kind,
        "complete": complete,
        "quick": args.quick,
        "train_steps": args.train_steps,
        "threads": args.threads,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "load_average_start": load0,
        "load_average_end": os.getloadavg(),
        "same_training_pairs": len(sums) == 1 if sums else None,
        "real_pair": MOTORCYCLE_SOURCE,
        "rows": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / json_name).write_text(json.dumps(result, indent=1) + "\n")
    plot_curves(rows, args.out / png_name, f"{args.experiment}: {kind}")
    write_side_report(result, args.out / md_name, png_name)
    done = "" if complete else f" ({len(rows)} sides so far)"
    print(f"[flow] wrote {args.out / md_name}{done}", file=sys.stderr, flush=True)


def kept_rows(path: Path, rows: list[dict], args: argparse.Namespace) -> list[dict]:
    """Rows of an earlier call with the same schedule whose sides were not run now (so that
    ``--ablate a`` then ``--ablate b`` report a and b side by side); each row keeps its command.
    A row is kept only while this script would still train that side with the same overrides:
    one whose recipe changed since (an edited ``ABLATIONS`` entry, another ``MATCHING_DEQ``) is
    dropped, not set beside the new rows as if it were current."""
    if not path.is_file():
        return []
    old = json.loads(path.read_text())
    if (old["train_steps"], old["quick"]) != (args.train_steps, args.quick):
        return []
    names = {r["name"] for r in rows}
    current = side_overrides(args, list(MATCHING_DEQ), list(ABLATIONS))
    kept, stale = [], []
    for r in old["rows"]:
        if r["name"] in names:
            continue
        same = current.get(r["name"]) == r["overrides"]
        (kept if same else stale).append({"command": old["command"], **r})
    if stale:
        print(
            f"[flow] {path}: dropped rows whose recipe changed since they were measured: "
            f"{', '.join(r['name'] for r in stale)}",
            file=sys.stderr,
            flush=True,
        )
    return kept


def write_side_report(result: dict, path: Path, png_name: str) -> None:
    rows, ref = result["rows"], result["rows"][0]
    scales = sorted({e["scale"] for r in rows for e in r.get("real") or []})
    headers = ["model", "test EPE", "/ zero", "val EPE", "/ zero", "1px %", "3px %", "5px %",
               "params", "converged", "CPU s", "CPU / DEQ", "step peak MiB", "peak RSS MiB",
               *(f"Motorcycle x{s} EPE / zero" for s in scales)]  # fmt: skip
    table = [
        [
            r["name"],
            r["test/epe"],
            r["test/epe_vs_zero"],
            r["val/epe"],
            r["val/epe_vs_zero"],
            r["test/1px"],
            r["test/3px"],
            r["test/5px"],
            r["params"],
            r["converged_fraction"],
            r["cpu_s"],
            r["cpu_s"] / ref["cpu_s"],
            r["step_peak_mib"],
            r["max_rss_mib"],
            *(real_flow_cell(r, s) for s in scales),
        ]
        for r in rows
    ]
    steps = result["train_steps"] or "the experiment's full schedule"
    lines = [
        f"# DEQ-Flow: {result['kind']}",
        "",
        f"`{result['command']}`",
        "",
        f"torch {result['torch']}, {result['cpus']} CPUs, {result['threads']} thread(s) per run; "
        f"load average {result['load_average_start'][0]:.2f} at the start, "
        f"{result['load_average_end'][0]:.2f} at the end. Training steps: {steps}"
        f"{' (--quick: a smoke run, not a measurement)' if result['quick'] else ''}. Same "
        f"training pairs on every side (data checksum): {fmt(result['same_training_pairs'])}.",
        *(
            []
            if result.get("complete", True)
            else ["", "**Incomplete:** the run stopped before its last side; these rows stand."]
        ),
        "",
        markdown_table(headers, table),
        "",
        "EPE and 1/3/5px on the same validation and test pairs (test: the best-validation "
        "checkpoint); `/ zero`: over the zero flow's EPE. `converged`: DEQ test samples whose "
        "solve met the tolerance. CPU: user + system time of the whole run (training, "
        "validation, test). `step peak`: one training step's peak memory above the memory in use "
        "before it.",
        "",
        f"Motorcycle: real photographs, {result.get('real_pair', MOTORCYCLE_SOURCE)}, frames "
        "downscaled by the factor shown; EPE over the pixels with known disparity, `/ zero` over "
        "the zero flow's on them, `converged`: whether the DEQ's solve on that pair met its "
        "tolerance (`not measured`: a row from before this evaluation).",
        "",
        f"![learning curves]({png_name})",
        "",
        *(
            f"`{r['name']}` test EPE / zero at solver budgets "
            + ", ".join(f"{b['max_iter']}: {b['test/epe_vs_zero']:.3f}" for b in r["eval_budgets"])
            + " (an estimate that holds at its fixed point stays level)."
            for r in rows
            if r.get("eval_budgets")
        ),
        "",
        *(f"* `{r['name']}`: `train.py {' '.join(r['overrides'])}`" for r in rows),
        "",
        *sorted({f"Written by `{r['command']}`." for r in rows if r.get("command")}),
        "",
    ]
    path.write_text("\n".join(lines))


# ----------------------------------------------------------------------------------------------
# --predict-memory: predict_flow.py on photographs, with and without max_side and tiles
# ----------------------------------------------------------------------------------------------

# (name, upscale of the 500x741 Motorcycle pair, max_side, tile, tile_batch: None as the app picks)
PREDICT_CASES = (
    ("motorcycle", 1, None, None, None),
    ("motorcycle", 1, 256, None, None),
    ("motorcycle x6 (13 MP)", 6, 512, None, None),
    ("motorcycle", 1, None, 256, None),
    ("motorcycle", 1, None, 256, 8),
    ("motorcycle x2 (1.5 MP)", 2, None, 512, None),
)


def plan_predict(
    size: Sequence[int], max_side: int | None, tile: int | None, tile_batch: int | None, levels: int
) -> tuple[tuple[int, int], Tiling | None]:
    """The size ``predict_flow.py`` solves a pair of ``size`` at on the CPU, and its tiles, as the
    app plans them from its options (the default overlap, the tile batch that fits)."""
    cpu = torch.device("cpu")
    solved = check_frame_size(size, max_side, levels, cpu, tile)
    options = tile_options(OmegaConf.create({"tile": tile, "tile_batch": tile_batch}), levels)
    return solved, (plan_tiling(solved, *options, levels, cpu) if options else None)


def prepare_predict(
    experiment: str, upscale: int, max_side: int | None, tile: int | None, tile_batch: int | None
) -> callable:
    """One ``predict_flow.py`` solve (``solve_within`` at ``max_side``, in tiles of ``tile``) of
    the Motorcycle pair upscaled by ``upscale``, with the experiment's model at random weights
    (the cost does not depend on them), ready to run: model and frames are set-up (for
    :func:`peak_memory_mib`)."""
    import hydra

    torch.manual_seed(SEED)
    task = hydra.utils.instantiate(train_config(experiment, "phantom").task, _recursive_=False)
    task.build_for(None)
    task.eval()
    pair = motorcycle_pair()
    img1, img2 = (
        F.interpolate(x[None], scale_factor=upscale, mode="bilinear") if upscale != 1 else x[None]
        for x in (pair.image1, pair.image2)
    )
    size, tiling = plan_predict(img1.shape[-2:], max_side, tile, tile_batch, task.model.corr_levels)

    @torch.no_grad()
    def go() -> None:
        solve_within(task, img1, img2, size, tiling=tiling)

    return go


def predict_memory(args: argparse.Namespace) -> None:
    """--predict-memory: peak memory and time of predicting a photograph pair per case."""
    load0 = os.getloadavg()
    prepares = [
        functools.partial(prepare_predict, args.experiment, *case[1:]) for case in PREDICT_CASES
    ]
    mem = peak_memory_mib(prepares, torch.device("cpu"), args.threads)
    levels = train_config(args.experiment, "phantom").model.corr_levels
    h, w = motorcycle_pair().valid.shape
    cases = []
    for (name, up, side, tile, batch), peak, prepare in zip(PREDICT_CASES, mem, prepares):
        size = (h * up, w * up)
        solved, tiling = plan_predict(size, side, tile, batch, levels)
        go = prepare()
        go()  # warm-up
        times, _ = timed(go, torch.device("cpu"), args.repeats, budget_s=args.budget)
        del go
        at_once = (
            correlation_bytes(solved, levels)
            if tiling is None
            else tiling.batch * correlation_bytes(tiling.shape, levels)
        )
        cases.append(
            {
                "name": name,
                "size": list(size),
                "megapixels": size[0] * size[1] / 1e6,
                "max_side": side,
                "solved_size": list(solved),
                "tile": tile,
                "tile_overlap": None if tiling is None else tiling.overlap,
                "tiles": 1 if tiling is None else len(tiling.boxes),
                "tile_batch": None if tiling is None else tiling.batch,
                "peak_mib": peak,
                "frames_mib": 2 * 3 * size[0] * size[1] * 4 / 2**20,  # float32 inputs, set-up
                "seconds": statistics.median(times),
                "correlation_mib": at_once / 2**20,
                "correlation_mib_without_max_side": correlation_bytes(size, levels) / 2**20,
            }
        )
        print(
            f"[flow] {name} max_side={side} tile={tile}: {cases[-1]}", file=sys.stderr, flush=True
        )
    cmd = f"OMP_NUM_THREADS={args.threads} python bench/flow.py {' '.join(sys.argv[1:])}".strip()
    result = {
        "command": cmd,
        "commit": git_commit(),
        "experiment": args.experiment,
        "weights": "random (memory and time do not depend on them)",
        "pair": MOTORCYCLE_SOURCE,
        "measures": "flow_frames.solve_within on one pair after one unmeasured call: peak_mib, "
        "the peak resident memory above the loaded model and frames (frames_mib, float32) "
        "(bench/_common.peak_memory_mib, a fresh process); seconds, the median wall time of "
        "--repeats calls; correlation_mib, the correlation volumes held at once (the solved "
        "frame's, or one forward's tile_batch tiles'); correlation_mib_without_max_side, the "
        "whole frame's at its own size",
        "threads": args.threads,
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "load_average_start": load0,
        "load_average_end": os.getloadavg(),
        "cases": cases,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "predict_memory.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"[flow] wrote {args.out / 'predict_memory.json'}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experiment", default="flow_tiny", help="whose model and solver to measure")
    ap.add_argument("--backward", default="phantom", choices=["phantom", "implicit"])
    ap.add_argument("--steps", type=int, nargs="+", default=[12, 24], help="N")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, nargs=2, default=[64, 64], metavar=("H", "W"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget", type=float, default=30.0, help="seconds per throughput case")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train", action="store_true", help="also time the flow_tiny training")
    ap.add_argument("--peer", nargs="+", choices=["raft_small", "raft_large"], help="train beside")
    ap.add_argument(
        "--ablate",
        nargs="*",
        choices=list(ABLATIONS),
        help="train DEQ-Flow variants (all: none named)",
    )
    ap.add_argument("--train-steps", type=int, default=None, help="shorter schedule (--peer)")
    ap.add_argument("--val-points", type=int, default=8, help="validations per run (--peer)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a smoke run of a few steps")
    ap.add_argument(
        "--real-scales",
        type=float,
        nargs="+",
        default=list(REAL_SCALES),
        help="Motorcycle pair scales the trained sides are evaluated at (--peer, --ablate)",
    )
    ap.add_argument(
        "--predict-memory",
        action="store_true",
        help="predict_flow.py's memory and time on photographs, with max_side and tile",
    )
    ap.add_argument(
        "--default",
        action="store_true",
        help="train --experiment at its full defaults (--threads 2 for the README's target); "
        "writes default.json under --out",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "flow")
    ap.add_argument("--runs", type=Path, default=ROOT / "bench" / "results" / "flow_runs")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.ablate == []:
        args.ablate = list(ABLATIONS)
    if args.predict_memory:
        predict_memory(args)
        return
    if args.default:
        train_default(args)
        return
    if args.peer or args.ablate:
        run_sides(args)
        return
    device = torch.device(args.device)

    rows = []
    for n in args.steps:
        prepares = [
            functools.partial(
                prepare_step,
                args.experiment,
                args.backward,
                mode,
                n,
                args.batch,
                tuple(args.size),
                args.device,
            )
            for mode in MODES
        ]
        mem = peak_memory_mib(prepares, device, args.threads)
        pps = [throughput(args, mode, n) for mode in MODES]
        rows.append([n, pps[0], pps[1], pps[0] / pps[1], mem[0], mem[1], _ratio(mem[1], mem[0])])
        print(f"N={n} done", file=sys.stderr, flush=True)

    load = f", load average {os.getloadavg()[1]:.1f}" if hasattr(os, "getloadavg") else ""
    cmd = "python bench/flow.py " + " ".join(sys.argv[1:])
    print(f"## Flow benchmark (`{cmd.strip()}`)\n")
    print(
        f"torch {torch.__version__}, {device} ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs{load}), {args.threads} thread(s); model of "
        f"experiment={args.experiment}, backward={args.backward}, batch {args.batch} of "
        f"{args.size[0]}x{args.size[1]}.\n"
    )
    print(
        markdown_table(
            [
                "N",
                "DEQ pairs/s",
                "unrolled pairs/s",
                "speed ratio",
                "DEQ peak MiB",
                "unrolled peak MiB",
                "memory unrolled/DEQ",
            ],
            rows,
        )
    )
    print(
        f"\nDEQ: N solver iterations forward, {args.backward} backward. unrolled: backprop "
        "through N applications of f (RAFT). speed ratio: DEQ / unrolled pairs per second "
        "(above 1: DEQ faster)."
    )
    if args.train:
        r = train_target("flow_tiny", args.threads)
        print(
            f"\n### Target: experiment=flow_tiny ({args.threads} thread(s))\n\n"
            f"wall time {r['wall_s'] / 60:.1f} min (imports, data, training, validation, test); "
            f"test/epe {r['test/epe']:.3f} against the zero flow's {r['test/epe_zero']:.3f} "
            f"(ratio {r['test/epe'] / r['test/epe_zero']:.2f}), val/epe {r['val/epe']:.3f}."
        )


def train_default(args: argparse.Namespace) -> None:
    """--default: ``train.py experiment=<experiment>`` with no other override, as a user runs it
    (the README's "<= 0.5x the zero flow's EPE in <= 10 minutes on 2 cores" target)."""
    load0 = os.getloadavg()
    # Another --seed (model initialisation and training pairs; the evaluation pairs stay the
    # data config's) measures how much the result owes to seed 0: default_seed<N>.json.
    seeded = () if args.seed == 0 else (f"seed={args.seed}",)
    suffix = seed_suffix(args.seed)
    run_dir = args.runs / f"default_{args.experiment}{suffix}"
    shutil.rmtree(run_dir, ignore_errors=True)
    (args.runs / f"{run_dir.name}.log").unlink(missing_ok=True)
    overrides = (*(QUICK if args.quick else ()), *seeded)
    r = train_target(args.experiment, args.threads, overrides, run_dir)
    load1 = os.getloadavg()
    keys = ("epe", "epe_zero", "1px", "3px", "5px", "fwd_converged", "fwd_res_p50", "fwd_steps")
    result = {
        "command": f"python bench/flow.py {' '.join(sys.argv[1:])}".strip(),
        "run": " ".join(
            [
                f"OMP_NUM_THREADS={args.threads} python train.py experiment={args.experiment}",
                *seeded,
            ]
        ),
        "seed": args.seed,
        "commit": git_commit(),
        "quick": args.quick,
        "threads": args.threads,
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "load_average_start": load0,
        "load_average_end": load1,
        **{k: r[k] for k in ("wall_s", "cpu_s", "max_rss_mib")},
        **{f"{s}/{k}": r.get(f"{s}/{k}") for s in ("val", "test") for k in keys},
        "eval_budgets": eval_budgets(deq_lightning.load(run_dir)),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"default{suffix}.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


@torch.no_grad()
def eval_budgets(model: FlowEstimator) -> list[dict]:
    """A trained run's best checkpoint (``deq_lightning.load`` of its run dir) on its own test
    pairs at several evaluation budgets: half and all of the training budget, the evaluation
    budget and twice it. A map with an attracting fixed point refines (or holds) its estimate as
    the budget grows; one that keeps drifting gets worse, which is what the residual term
    (task.residual_loss_weight) targets."""
    cfg = model.run.config
    train_iter, eval_iter = int(cfg.solver.max_iter), int(cfg.solver.eval_opts.max_iter)
    datamodule = model.run.datamodule()
    datamodule.setup("test")
    zero = datamodule.epe_zero["test"]
    rows = []
    for budget in sorted({max(1, train_iter // 2), train_iter, eval_iter, 2 * eval_iter}):
        errors, stats = [], []
        with deq_override(model.task.model, eval_solver_opts={"max_iter": budget}):
            for batch in datamodule.test_dataloader():
                with warnings.catch_warnings():  # the converged fraction is recorded instead
                    warnings.simplefilter("ignore", NotAtEquilibriumWarning)
                    flow = model.predict(batch["image1"], batch["image2"])
                errors.append(epe_map(flow, batch["flow"]).flatten())
                stats += [s.forward for s in model.last_stats]
        epe = float(torch.cat(errors).double().mean())  # pooled over all pixels, as test/epe
        rows.append(
            {
                "max_iter": budget,
                "test/epe": epe,
                "test/epe_vs_zero": epe / zero,
                "test/fwd_converged": float(torch.cat([s.converged for s in stats]).float().mean()),
                "test/fwd_res_p50": float(torch.cat([s.rel_res.float() for s in stats]).median()),
            }
        )
        print(f"[flow] eval budget {budget}: {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


if __name__ == "__main__":
    main()
