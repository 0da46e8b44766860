"""HyperAnderson vs Anderson on a trained tiny model: evaluations and wall-clock to equal residual.

python bench/hyperanderson.py                 # trains cls_digits once (~2 min), then its solver
python bench/hyperanderson.py --run logs/train/runs/<run>   # any trained run (its hyperanderson.pt
                                                              # is trained first if missing)

The target (issue 7; thesis ch. 6, docs/thesis.md §5: "1.6-2x inference speedup"): reach the
residual Anderson reaches within the run's own evaluation budget in >= 1.5x less wall-clock. Per
validation batch, Anderson first runs at the run's budget; the mean relative residual it reaches
is the target; then both solvers run side by side with that target as tolerance (at most
``--cap`` evaluations), each sample stopping on its own, and are timed on the same batches.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

import torch
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import fmt, markdown_table, timed  # noqa: E402
from deq_lightning.app.hypersolver import (  # noqa: E402
    WEIGHTS_FILE,
    HyperTrainOptions,
    collect_problems,
    forward_budget,
    frozen_task,
    train_for_run,
)
from deq_lightning.app.runs import load_run  # noqa: E402
from deq_lightning.deq.hyper import hyper_solve, load_hypersolver  # noqa: E402
from deq_lightning.deq.scope import forward_scope  # noqa: E402
from deq_lightning.deq.solvers import run_flat  # noqa: E402


def train_digits(where: Path) -> Path:
    """One default cls_digits training run (train.py, its embedded default config)."""
    run_dir = where / "cls_digits"
    args = ["logger=csv", "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}"]
    print(f"training cls_digits into {run_dir} (about 2 minutes on CPU) ...", flush=True)
    subprocess.run([sys.executable, str(ROOT / "train.py"), *args], check=True, cwd=ROOT)
    return run_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, help="a train.py run dir (default: train cls_digits)")
    parser.add_argument("--retrain", action="store_true", help="retrain its hyperanderson.pt")
    parser.add_argument("--steps", type=int, default=300, help="hypersolver training steps")
    parser.add_argument("--batches", type=int, default=4, help="validation batches measured")
    parser.add_argument("--cap", type=int, default=100, help="evaluation cap of both solvers")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per solver and batch")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run_dir = args.run or train_digits(Path(tempfile.mkdtemp(prefix="bench_hyper_")))
    weights = run_dir / WEIGHTS_FILE
    hyper = {"steps": args.steps}
    cfg = OmegaConf.create(
        {"run_dir": str(run_dir), "ckpt_path": None, "out": None, "hyper": hyper}
    )
    if args.retrain or not weights.is_file():
        train_for_run(cfg)
    net, meta = load_hypersolver(weights)
    run = load_run(run_dir)
    task, datamodule = frozen_task(run), run.datamodule()
    budget = forward_budget(task)
    trained = {**vars(HyperTrainOptions()), **meta.get("options", {})}
    m, lam, beta = trained["m"], trained["lam"], trained["beta"]
    # Only f and z0 of each batch are used here; the run's own budget keeps collection short.
    probe = HyperTrainOptions(
        batches=args.batches, holdout=0, ref_max_iter=budget["max_iter"], ref_tol=budget["tol"]
    )
    problems = collect_problems(task, datamodule, probe, split="val")
    rows, ratios_t, ratios_n = [], [], []
    for i, p in enumerate(problems):
        base = run_flat("anderson", p.f, p.x0, {**budget, "m": m, "lam": lam, "beta": beta})
        target = float(base.stats.rel_res.mean())
        opts = dict(max_iter=args.cap, tol=target, stop_mode="rel", diverge_factor=1e3)
        aa_opts = {**opts, "m": m, "lam": lam, "beta": beta}
        runs = {
            "anderson": partial(run_flat, "anderson", p.f, p.x0, aa_opts),
            "hyperanderson": partial(hyper_solve, net, p.f, p.x0, **aa_opts),
        }
        out = {}
        for name, fn in runs.items():
            with forward_scope():
                times, res = timed(fn, p.x0.device, args.repeats, budget_s=10.0)
            st = res.stats
            out[name] = (statistics.median(times), float(st.nstep.float().mean()), st)
        (ta, na, sa), (th, nh, sh) = out["anderson"], out["hyperanderson"]
        ratios_t.append(ta / th)
        ratios_n.append(na / nh)
        rows.append(
            [i, p.x0.shape[0], fmt(target), fmt(na), fmt(nh), f"{sa.nfe}/{sh.nfe}",
             fmt(float(sa.rel_res.mean())),
             fmt(float(sh.rel_res.mean())), f"{1e3 * ta:.1f}", f"{1e3 * th:.1f}", f"{ta / th:.2f}"]
        )  # fmt: skip
    cmd = "python bench/hyperanderson.py " + " ".join(sys.argv[1:])
    print(f"\n## HyperAnderson benchmark (`{cmd.strip()}`)\n")
    load = f", load average {os.getloadavg()[1]:.1f}" if hasattr(os, "getloadavg") else ""
    print(
        f"torch {torch.__version__}, cpu ({platform.machine()}, {os.cpu_count()} CPUs{load}), "
        f"{args.threads} thread(s). Run {run_dir}; its eval budget {budget['max_iter']} "
        f"evaluations, tol {budget['tol']:g} ({budget['stop_mode']}); Anderson m={m}, "
        f"lam={lam:g}, beta={beta:g}; solver trained {meta.get('options', {}).get('steps')} "
        f"steps.\n"
    )
    headers = ["batch", "B", "target rel res", "NFE AA", "NFE HA", "batch evals AA/HA"]
    headers += ["res AA", "res HA"]
    headers += ["ms AA", "ms HA", "time AA/HA"]
    print(markdown_table(headers, rows))
    gt, gn = statistics.geometric_mean(ratios_t), statistics.geometric_mean(ratios_n)
    print(
        f"\nNFE: mean per-sample evaluations to the returned iterate; batch evals: evaluations until "
        f"the last sample stopped (what the wall-clock pays); ms: median wall-clock of the whole "
        f"solve. Geometric mean over batches: wall-clock AA/HA {gt:.2f}x, NFE AA/HA "
        f"{gn:.2f}x. Target >= 1.5x wall-clock: {'met' if gt >= 1.5 else 'NOT met'}."
    )


if __name__ == "__main__":
    main()
