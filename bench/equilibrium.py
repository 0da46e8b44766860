"""DEQ against its layered twin of the same size, trained side by side on the same data.

    OMP_NUM_THREADS=2 python bench/equilibrium.py --families digits seg
    OMP_NUM_THREADS=2 python bench/equilibrium.py --families lm --lm-data-dir <folder>
    python bench/equilibrium.py --families digits --ablate      # + the DEQ without its JR term

For each family the DEQ recipe (``experiment=...``) and its layered twin (the same experiment
with ``model=<the DEQ's model>_layered``: the same layer class stacked with untied weights, sized
to the DEQ's parameter count) run one after the other through ``train.py``, in fresh processes,
on the same data, batches, steps, optimizer and schedule. What is measured for each run:

* the test metric (``test/acc``, ``test/ppl``, ``test/miou``) and the parameter count;
* the run's CPU time (user + system of the process, ``os.wait4``), wall time and peak resident
  memory (``ru_maxrss``: Python, torch and data included);
* the peak memory of one training step above the memory in use before it (a fresh process;
  ``_common.peak_memory_mib``): activations, gradients and solver buffers;
* for the DEQ, its equilibrium over training from the run's CSV log: converged fraction and
  median residual per validation and per training epoch, and at the end (``test/fwd_*``).

Writes ``<out>/report.md``, ``<out>/<family>.png`` and ``<out>/results.json`` (one object per
family and model with ``family``, ``model``, ``metric``, ``value``, ``params``,
``converged_fraction``, ``cpu_s`` and more); runs are kept under ``<out>/runs/`` (git-ignored).
Families: ``digits`` (the default ``python train.py``), ``lm`` (``experiment=lm_small`` on a
word-level corpus in PTB or WikiText format: ``--lm-data-dir``, ``--lm-data ptb|wikitext2``) and
``seg`` (``experiment=seg_tiny`` on the embedded scenes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from _common import (
    count_params,
    git_commit,
    history,
    markdown_table,
    run_train,
    step_peak_mib,
)

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Family:
    experiment: str
    layered_model: str
    metric: str
    higher_is_better: bool
    # Extra DEQ variants for --ablate: name -> overrides (what each ingredient is worth).
    ablations: dict[str, list[str]] = field(default_factory=dict)


FAMILIES = {
    "digits": Family(
        experiment="cls_digits",
        layered_model="mdeq_digits_layered",
        metric="test/acc",
        higher_is_better=True,
        ablations={
            "deq_no_jr": ["task.jac_loss_weight=0"],
            "deq_no_jr_old_budget": [
                "task.jac_loss_weight=0",
                "solver.max_iter=12",
                "solver.eval_opts.max_iter=12",
                "backward.max_iter=12",
            ],
        },
    ),
    "lm": Family(
        experiment="lm_small",
        layered_model="deq_transformer_small_layered",
        metric="test/ppl",
        higher_is_better=False,
        ablations={"deq_no_jr": ["task.jac_loss_weight=0"]},
    ),
    "seg": Family(
        experiment="seg_tiny",
        layered_model="mdeq_seg_tiny_layered",
        metric="test/miou",
        higher_is_better=True,
        ablations={"deq_no_jr": ["task.jac_loss_weight=0"]},
    ),
}


# ----------------------------------------------------------------------------------------------
# One family
# ----------------------------------------------------------------------------------------------


# --quick: a smoke run of the whole pipeline (a few batches per stage), not a measurement.
QUICK = [
    "trainer.max_epochs=1",
    "trainer.max_steps=6",
    "+trainer.limit_train_batches=6",
    "+trainer.limit_val_batches=2",
    "+trainer.limit_test_batches=2",
    "task.pretrain_steps=2",
]


def family_overrides(name: str, args: argparse.Namespace) -> list[str]:
    fam = FAMILIES[name]
    out = [f"experiment={fam.experiment}", f"seed={args.seed}", *(QUICK if args.quick else [])]
    if name == "lm":
        if not args.lm_data_dir:
            raise SystemExit(
                "--families lm needs --lm-data-dir <folder with ptb.{train,valid,test}.txt or "
                "wiki.{train,valid,test}.tokens>"
            )
        out += [f"data={args.lm_data}", f"data.data_dir={Path(args.lm_data_dir).resolve()}"]
    return out


def run_family(name: str, args: argparse.Namespace) -> list[dict]:
    fam = FAMILIES[name]
    base = family_overrides(name, args)
    variants = {"deq": base, "layered": [*base, f"model={fam.layered_model}"]}
    if args.ablate:
        variants.update({k: [*base, *v] for k, v in fam.ablations.items()})
    rows = []
    command = f"OMP_NUM_THREADS={args.threads} python bench/equilibrium.py {' '.join(sys.argv[1:])}"
    for old in sorted((args.out / "runs").glob(f"{name}_*")):
        print(f"[equilibrium] removing the earlier run {old}", flush=True)
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    for model, overrides in variants.items():
        run_dir = args.out / "runs" / f"{name}_{model}"
        print(f"[equilibrium] {name}/{model}: train.py {' '.join(overrides)}", flush=True)
        res = run_train(overrides, run_dir, args.threads)
        m = res["metrics"]
        hist = history(run_dir)
        row = {
            "family": name,
            "model": model,
            "experiment": fam.experiment,
            "command": command,
            "commit": git_commit(),
            "overrides": overrides,
            "metric": fam.metric,
            "value": m.get(fam.metric),
            "params": count_params(run_dir),
            "converged_fraction": m.get("test/fwd_converged"),
            "val_converged_fraction": m.get("val/fwd_converged"),
            "train_converged_fraction": _last(hist.get("train/fwd_converged")),
            "residual_p50": m.get("test/fwd_res_p50"),
            "residual_p90": m.get("test/fwd_res_p90"),
            "solver_steps": m.get("test/fwd_steps"),
            "cpu_s": res["cpu_s"],
            "wall_s": res["wall_s"],
            "max_rss_mib": res["max_rss_mib"],
            "step_peak_mib": step_peak_mib(run_dir, args.threads),
            "history": {
                k: v
                for k, v in hist.items()
                if k
                in (
                    fam.metric.replace("test/", "val/"),
                    "val/fwd_converged",
                    "val/fwd_res_p50",
                    "train/fwd_converged",
                    "train/fwd_res_p50",
                )
            },
        }
        if model == "layered":
            row["converged_fraction"] = None
        rows.append(row)
        print(f"[equilibrium] {name}/{model}: {fam.metric}={row['value']}", flush=True)
    plot_family(name, rows, args.out / f"{name}.png")
    return rows


def _last(series: list[tuple[int, float]] | None) -> float | None:
    return series[-1][1] if series else None


def plot_family(name: str, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fam = FAMILIES[name]
    val_metric = fam.metric.replace("test/", "val/")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), dpi=100)
    for row in rows:
        h = row["history"]
        if h.get(val_metric):
            axes[0].plot(*zip(*h[val_metric]), marker="o", ms=3, label=row["model"])
        if row["model"] == "layered":
            continue
        for key, style in (("val/fwd_converged", "-o"), ("train/fwd_converged", "--")):
            if h.get(key):
                axes[1].plot(*zip(*h[key]), style, ms=3, label=f"{row['model']} {key[:5]}")
        for key, style in (("val/fwd_res_p50", "-o"), ("train/fwd_res_p50", "--")):
            if h.get(key):
                axes[2].semilogy(*zip(*h[key]), style, ms=3, label=f"{row['model']} {key[:5]}")
    axes[0].set_title(f"{name}: {val_metric}")
    axes[1].set_title("DEQ: fraction of samples converged")
    axes[1].set_ylim(-0.05, 1.05)
    axes[2].set_title("DEQ: median stopping residual")
    for ax in axes:
        ax.set_xlabel("training step")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def write_report(rows: list[dict], args: argparse.Namespace, load: tuple) -> None:
    out = args.out
    (out / "results.json").write_text(json.dumps(rows, indent=1) + "\n")
    lines = [
        "# DEQ against its layered twin",
        "",
        "Each family's rows come from the command in its section (the latest run of that "
        "family with this output folder).",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"{args.threads} threads; load average {load[0]:.2f} at the start, "
        f"{os.getloadavg()[0]:.2f} at the end. Runs one after the other, each in a fresh process.",
        "",
        "Both models of a family are trained by `train.py` on the same data, batches, steps, "
        "optimizer and schedule (same seed); the layered twin is the same layer class stacked "
        "with untied weights, sized to the DEQ's parameter count. `converged` is the DEQ's test "
        "fraction of samples whose solve met the tolerance of its config within its evaluation "
        "budget; `median res.` its median stopping residual; `step peak` the peak memory of one "
        "training step above the memory in use before it; `CPU` the run's user + system time "
        "(training, validation and test).",
        "",
    ]
    headers = [
        "family",
        "model",
        "metric",
        "value",
        "vs layered",
        "params",
        "converged",
        "median res.",
        "steps",
        "CPU s",
        "wall s",
        "step peak MiB",
        "peak RSS MiB",
    ]
    table = []
    for row in rows:
        ref = next(
            (r for r in rows if r["family"] == row["family"] and r["model"] == "layered"), None
        )
        ratio = row["value"] / ref["value"] if ref and ref["value"] and row["value"] else None
        table.append(
            [
                row["family"],
                row["model"],
                row["metric"],
                row["value"],
                f"{ratio:.3f}x" if ratio is not None else None,
                row["params"],
                row["converged_fraction"],
                row["residual_p50"] if row["model"] != "layered" else None,
                row["solver_steps"] if row["model"] != "layered" else None,
                row["cpu_s"],
                row["wall_s"],
                row["step_peak_mib"],
                row["max_rss_mib"],
            ]
        )
    lines += [markdown_table(headers, table), ""]
    for name in dict.fromkeys(r["family"] for r in rows):
        family_rows = [r for r in rows if r["family"] == name]
        lines += [
            f"## {name}",
            "",
            f"`{family_rows[0]['command']}`",
            "",
            f"![{name}]({name}.png)",
            "",
        ]
        for row in family_rows:
            lines.append(f"* `{row['model']}`: `train.py {' '.join(row['overrides'])}`")
        lines.append("")
    (out / "report.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--families", nargs="+", default=["digits", "seg"], choices=list(FAMILIES))
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "equilibrium")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 2)))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lm-data-dir", default=None, help="a word-level corpus folder (lm family)")
    ap.add_argument("--lm-data", default="ptb", choices=["ptb", "wikitext2", "wikitext103"])
    ap.add_argument("--ablate", action="store_true", help="also the DEQ without its ingredients")
    ap.add_argument("--quick", action="store_true", help="a smoke run of a few batches")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    load = os.getloadavg()
    rows = []
    results = args.out / "results.json"
    previous = json.loads(results.read_text()) if results.is_file() else []
    for name in args.families:
        rows += run_family(name, args)
    # Families not run now keep their rows from an earlier call with the same --out.
    kept = [r for r in previous if r["family"] not in args.families]
    write_report(kept + rows, args, load)
    print(f"[equilibrium] wrote {args.out / 'report.md'}", flush=True)


if __name__ == "__main__":
    main()
