"""DEQ-TrellisNet against its layered twin (memory of one training step) and its CPU recipes.

    OMP_NUM_THREADS=1 python bench/trellisnet.py --out reports/trellisnet

writes ``<out>/results.json`` (studies run separately are merged into it):

* ``memory``: one training step of ``lm_trellis_tiny`` (its batch, the task's own loss): the DEQ
  with N forward and N backward solver steps against the twin of N levels (``model.depth=N``,
  the same weight-tied layer applied N times, backprop through all of them), N = 4..64.
* ``ptb``: the same step at the thesis's PTB size (``experiment=ptb_deq_trellisnet``'s model,
  24M parameters, a 10k vocabulary, 150-token sequences as in the DEQ paper's memory table), DEQ
  against the thesis's 60-level TrellisNet; a smaller batch than the paper's 15 (``--ptb-batch``)
  so that it runs on a CPU: the twin's activations grow linearly with it.
* ``train``: ``python train.py experiment=lm_trellis_tiny`` and ``experiment=copy_memory_tiny``
  as given, their test metrics, wall and CPU time.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import hydra
import torch
from _common import git_commit, peak_memory_mib, run_train
from hydra import compose, initialize_config_dir

from deq_lightning.config import register_schemas
from deq_lightning.deq import deq_override

ROOT = Path(__file__).resolve().parents[1]
STEPS = (4, 8, 16, 32, 64)


def compose_experiment(experiment: str, overrides: list[str]):
    register_schemas()
    hydra.core.global_hydra.GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "train", [f"experiment={experiment}", "hydra.runtime.output_dir=/tmp", *overrides]
        )


def prepare_tiny_step(n: int, twin: bool) -> Callable[[], None]:
    """One lm_trellis_tiny training step: DEQ with n solver steps, or the twin of n levels."""
    torch.manual_seed(0)
    overrides = ["task.pretrain_steps=0", f"model.depth={n if twin else 0}"]
    cfg = compose_experiment("lm_trellis_tiny", overrides)
    dm = hydra.utils.instantiate(cfg.data, _convert_="all")
    dm.setup("fit")
    task = hydra.utils.instantiate(cfg.task, _recursive_=False)
    task.build_for(dm)
    task.train()
    batch = next(iter(dm.train_dataloader()))
    changes = {} if twin else {"solver_opts": {"max_iter": n, "tol": 1e-30}}
    if not twin:
        changes["backward_opts"] = {"max_iter": n, "tol": 1e-30}

    def step() -> None:
        with deq_override(task.model, **changes), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # self.log without a trainer
            loss = task.training_step(batch, 0)
        loss.backward()
        task.zero_grad(set_to_none=True)

    return step


def prepare_ptb_step(depth: int, batch: int, length: int, n: int) -> Callable[[], None]:
    """One training step of the PTB-size model on random tokens (the memory does not depend on
    the words): the DEQ with n forward/backward solver steps, or the twin of ``depth`` levels."""
    torch.manual_seed(0)
    cfg = compose_experiment("ptb_deq_trellisnet", [f"model.depth={depth}"])
    from deq_lightning.config import build_model, plain

    model_cfg = {**plain(cfg.task.model), "vocab_size": 10000}
    model = build_model(model_cfg, plain(cfg.task.solver), plain(cfg.task.backward)).train()
    x = torch.randint(0, 10000, (batch, length))
    changes = {"solver_opts": {"max_iter": n}, "backward_opts": {"max_iter": n}}

    def step() -> None:
        if depth:
            out, _ = model(x, x)
        else:
            with deq_override(model, **changes):
                out, _ = model(x, x)
        out.nll.mean().backward()
        model.zero_grad(set_to_none=True)

    return step


def n_params(experiment: str, overrides: list[str], vocab: int) -> int:
    from deq_lightning.config import build_model, plain

    cfg = compose_experiment(experiment, overrides)
    model = build_model({**plain(cfg.task.model), "vocab_size": vocab}, None, None)
    return sum(p.numel() for p in model.parameters())


def memory_study(threads: int) -> dict:
    rows = []
    for n in STEPS:
        prepares = [functools.partial(prepare_tiny_step, n, twin) for twin in (False, True)]
        deq, twin = peak_memory_mib(prepares, torch.device("cpu"), threads)
        rows.append({"n": n, "deq_mib": deq, "twin_mib": twin})
        log(f"memory N={n}: DEQ {deq:.1f} MiB, twin {twin:.1f} MiB")
    return {
        "experiment": "lm_trellis_tiny",
        "params": n_params("lm_trellis_tiny", [], 25),
        "rows": rows,
    }


def ptb_study(batch: int, depth: int, threads: int) -> dict:
    length, n = 150, 10
    prepares = [
        functools.partial(prepare_ptb_step, 0, batch, length, n),
        functools.partial(prepare_ptb_step, depth, batch, length, n),
    ]
    start = time.perf_counter()
    deq, twin = peak_memory_mib(prepares, torch.device("cpu"), threads)
    log(f"PTB size, batch {batch} x {length}: DEQ {deq:.0f} MiB, {depth}-level twin {twin:.0f} MiB")
    return {
        "experiment": "ptb_deq_trellisnet",
        "params": n_params("ptb_deq_trellisnet", [], 10000),
        "batch": batch,
        "length": length,
        "deq_solver_steps": n,
        "twin_depth": depth,
        "deq_mib": deq,
        "twin_mib": twin,
        "seconds": time.perf_counter() - start,
    }


RECIPES = {
    "lm_trellis_tiny": ("test/ppl", "test/ppl_floor"),
    "copy_memory_tiny": ("test/recall_acc", None),
}


def train_study() -> dict:
    results = {}
    for experiment in RECIPES:
        run_dir = Path(tempfile.mkdtemp(prefix=f"trellisnet_{experiment}_")) / "run"
        res = run_train([f"experiment={experiment}"], run_dir, 1)
        metrics, wall, cpu = res["metrics"], res["wall_s"], res["cpu_s"]
        metric, floor = RECIPES[experiment]
        results[experiment] = {
            "command": f"OMP_NUM_THREADS=1 python train.py experiment={experiment}",
            metric: metrics[metric],
            "test/fwd_converged": metrics.get("test/fwd_converged"),
            "wall_s": wall,
            "cpu_s": cpu,
            "load_avg_1min_end": os.getloadavg()[0],
        }
        if floor:
            results[experiment][floor] = metrics[floor]
            results[experiment]["ratio_to_floor"] = metrics[metric] / metrics[floor]
        log(f"{experiment}: {results[experiment]}")
    return results


def log(msg: str) -> None:
    print(f"[trellisnet] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "trellisnet")
    ap.add_argument("--studies", nargs="+", default=["memory", "ptb", "train"])
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", 1)))
    ap.add_argument("--ptb-batch", type=int, default=2)
    ap.add_argument("--ptb-depth", type=int, default=60)  # the thesis's 60-layer TrellisNet
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    saved = args.out / "results.json"
    results = json.loads(saved.read_text()) if saved.is_file() else {}
    start = time.perf_counter()
    # Each study's commit: studies run separately share this file (bench/readme.py dates them).
    results.setdefault("commits", {}).update(dict.fromkeys(args.studies, git_commit()))
    if "memory" in args.studies:
        results["memory"] = memory_study(args.threads)
    if "ptb" in args.studies:
        results["ptb"] = ptb_study(args.ptb_batch, args.ptb_depth, args.threads)
    if "train" in args.studies:
        results["train"] = train_study()
    results.setdefault("invocations", []).append(
        f"`python bench/trellisnet.py {' '.join(sys.argv[1:])}`: torch {torch.__version__}, CPU "
        f"({os.cpu_count()} cores, load average {os.getloadavg()[1]:.1f} at the end), "
        f"{args.threads} thread(s), {(time.perf_counter() - start) / 60:.1f} min."
    )
    saved.write_text(json.dumps(results, indent=1))
    print(f"results: {saved}")


if __name__ == "__main__":
    main()
