"""``task.compile=true`` against eager, side by side in one process: what compiling the
equilibrium cell costs once and saves (or loses) per call.

    OMP_NUM_THREADS=2 python bench/compile.py --out reports/compile.json

Each case builds its experiment's model twice with the same weights, compiles the second one's
equilibrium cell (``deq_lightning.tasks.base.compile_equilibrium_cells``), and times, interleaved
(eager, compiled, eager, ...), an evaluation solve (no gradient) and a training step (forward,
loss, implicit backward). The first compiled call of each kind is reported apart as the
compilation cost. The outputs of both are compared, so a speed-up that changes results would
show. CPU inductor needs a C++ compiler; on a GPU the same command measures CUDA graphs-free
inductor kernels.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from _common import git_commit, markdown_table
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    experiment: str
    batch: int
    model_extra: tuple[tuple[str, object], ...] = ()


CASES = {
    "digits": Case("cls_digits", 64),
    "lm_tiny": Case("lm_tiny", 16, (("vocab_size", 25),)),
}


def build(case: Case) -> tuple[nn.Module, Callable[[nn.Module], Tensor]]:
    """The experiment's model (as ``train.py`` builds it) and a function giving a scalar loss."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from deq_lightning.config import build_model, plain, register_schemas

    register_schemas()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"experiment={case.experiment}"])
    torch.manual_seed(0)
    model = build_model(
        {**plain(cfg.task.model), **dict(case.model_extra)},
        plain(cfg.task.solver),
        plain(cfg.task.backward),
    )
    g = torch.Generator().manual_seed(0)
    if case.experiment == "cls_digits":
        x = torch.randn(case.batch, 1, 8, 8, generator=g)
        y = torch.randint(0, 10, (case.batch,), generator=g)
        return model, lambda m: nn.functional.cross_entropy(m(x)[0], y)
    tokens = torch.randint(0, 25, (case.batch, cfg.data.tgt_len + 1), generator=g)
    return model, lambda m: m(tokens[:, :-1], tokens[:, 1:])[0].nll.mean()


def measure(case: Case, repeats: int) -> dict:
    from deq_lightning.tasks.base import compile_equilibrium_cells

    eager, loss_of = build(case)
    compiled = copy.deepcopy(eager)
    compile_equilibrium_cells(compiled)

    def solve(m: nn.Module) -> Tensor:
        m.eval()
        with torch.no_grad():
            return loss_of(m)

    def step(m: nn.Module) -> Tensor:
        m.train()
        m.zero_grad(set_to_none=True)
        loss = loss_of(m)
        loss.backward()
        return loss.detach()

    out: dict = {"experiment": case.experiment, "batch": case.batch}
    for kind, fn in (("eval_solve", solve), ("train_step", step)):
        start = time.perf_counter()
        torch.manual_seed(1)
        first = fn(compiled)
        out[f"{kind}_compile_s"] = time.perf_counter() - start
        torch.manual_seed(1)
        fn(eager)  # warm-up
        times: dict[str, list[float]] = {"eager": [], "compiled": []}
        values: dict[str, float] = {}
        for _ in range(repeats):
            for name, m in (("eager", eager), ("compiled", compiled)):
                torch.manual_seed(1)  # the same dropout masks on both sides
                start = time.perf_counter()
                values[name] = float(fn(m))
                times[name].append(time.perf_counter() - start)
        e, c = statistics.median(times["eager"]), statistics.median(times["compiled"])
        out[kind] = {
            "eager_ms": 1e3 * e,
            "compiled_ms": 1e3 * c,
            "speedup": e / c,
            "loss_eager": values["eager"],
            "loss_compiled": values["compiled"],
            "first_compiled_loss": float(first),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=ROOT / "reports" / "compile.json")
    args = ap.parse_args()
    threads = int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))
    torch.set_num_threads(threads)
    load = os.getloadavg()[0]
    rows = [measure(CASES[name], args.repeats) for name in args.cases]
    report = {
        "command": f"OMP_NUM_THREADS={threads} python bench/compile.py --out {args.out.name}",
        "commit": git_commit(),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
        "threads": threads,
        "load_average": [load, os.getloadavg()[0]],
        "cases": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    table = [
        [
            r["experiment"],
            kind,
            f"{r[kind]['eager_ms']:.0f}",
            f"{r[kind]['compiled_ms']:.0f}",
            f"{r[kind]['speedup']:.2f}x",
            f"{r[kind + '_compile_s']:.0f}",
            f"{abs(r[kind]['loss_compiled'] - r[kind]['loss_eager']):.1e}",
        ]
        for r in rows
        for kind in ("eval_solve", "train_step")
    ]
    headers = ["experiment", "call", "eager ms", "compiled ms", "speed-up", "compile s", "|dloss|"]
    print(markdown_table(headers, table))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
