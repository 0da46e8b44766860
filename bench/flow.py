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
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import statistics
import sys
from pathlib import Path

import torch
from _common import markdown_table, peak_memory_mib, timed, train_target
from hydra import compose, initialize_config_dir

from deq_lightning.config import register_schemas
from deq_lightning.deq import deq_override
from deq_lightning.tasks.base import build_model, plain

ROOT = Path(__file__).resolve().parents[1]
SEED = 0
MODES = ("deq", "unrolled")


def model_config(experiment: str, backward: str) -> tuple[dict, dict, dict]:
    register_schemas()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                f"experiment={experiment}",
                f"backward={backward}",
                "hydra.runtime.output_dir=/tmp",
            ],
            return_hydra_config=False,
        )
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
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
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


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


if __name__ == "__main__":
    main()
