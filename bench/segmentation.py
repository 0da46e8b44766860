"""Segmentation benchmark: MDEQ against the same network unrolled to the same number of steps.

    OMP_NUM_THREADS=1 python bench/segmentation.py            # the seg_tiny model, ~2 min
    OMP_NUM_THREADS=2 python bench/segmentation.py --train --threads 2   # + the tiny training target
    python bench/segmentation.py --experiment cityscapes_mdeq_small --size 512 1024 --batch 1 \
        --steps 27 --device cuda

Prints Markdown. Both sides are one MDEQSegmenter (the model of ``--experiment``), the same
batches, the same per-pixel cross entropy and the same SGD step; only the way the equilibrium is
reached and differentiated differs:

* **MDEQ**: the experiment's solver runs exactly N iterations (tolerance set out of reach), and
  the gradient comes from the implicit backward (the experiment's backward solver, at most N
  iterations): memory does not grow with N;
* **unrolled**: f applied N times from the same start, backpropagated through every application
  (``backward=unrolled, steps=N``): the explicit weight-tied network of depth N that the DEQ
  stands for; its activation memory grows linearly with N.

Throughput is training images per second (median step over ``--repeats`` steps after one
warm-up step). Peak memory is that of one training step above the memory in use after set-up,
measured in one fresh process per side (``bench/_common.peak_memory_mib``). ``--train`` also
runs ``train.py experiment=seg_tiny`` and reports its wall time and test mIoU (the target:
mIoU >= 0.7 in <= 10 minutes on 2 CPU cores).
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
import torch.nn.functional as F
from _common import markdown_table, peak_memory_mib, timed, train_target
from hydra import compose, initialize_config_dir

from deq_lightning.config import build_model, plain, register_schemas
from deq_lightning.deq import deq_override

ROOT = Path(__file__).resolve().parents[1]
SEED = 0


def model_config(experiment: str) -> tuple[dict, dict, dict]:
    register_schemas()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[f"experiment={experiment}", "hydra.runtime.output_dir=/tmp"],
            return_hydra_config=False,
        )
    return plain(cfg.model), plain(cfg.solver), plain(cfg.backward)


def prepare_step(
    experiment: str,
    mode: str,
    n: int,
    batch: int,
    size: tuple[int, int],
    device: str,
) -> callable:
    """One training step of ``mode`` ("mdeq" / "unrolled") with N = ``n``, ready to run."""
    model_cfg, solver, backward = model_config(experiment)
    torch.manual_seed(SEED)
    dev = torch.device(device)
    model = build_model(model_cfg, solver, backward).to(dev).train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(batch, model_cfg["in_channels"], *size, generator=g).to(dev)
    y = torch.randint(0, model_cfg["num_classes"], (batch, *size), generator=g).to(dev)
    if mode == "mdeq":
        changes = {
            "solver_opts": {"max_iter": n, "tol": 1e-30},
            "backward_opts": {"max_iter": n},
        }
    else:
        changes = {"backward": "unrolled", "backward_opts": {"steps": n}}

    def go() -> None:
        with deq_override(model, **changes):
            logits, _ = model(x)
        logits = F.interpolate(logits, size=size, mode="bilinear", align_corners=False)
        F.cross_entropy(logits, y).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return go


def throughput(args: argparse.Namespace, mode: str, n: int) -> float:
    """Training images per second (median step)."""
    go = prepare_step(args.experiment, mode, n, args.batch, tuple(args.size), args.device)
    go()  # warm-up
    times, _ = timed(go, torch.device(args.device), args.repeats, budget_s=args.budget)
    return args.batch / statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--experiment", default="seg_tiny", help="whose model to measure")
    ap.add_argument("--steps", type=int, nargs="+", default=[6, 12, 24], help="N")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, nargs=2, default=[32, 32], metavar=("H", "W"))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--budget", type=float, default=30.0, help="seconds per throughput case")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--train", action="store_true", help="also time the seg_tiny training")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    rows = []
    for n in args.steps:
        prepares = [
            functools.partial(
                prepare_step, args.experiment, mode, n, args.batch, tuple(args.size), args.device
            )
            for mode in ("mdeq", "unrolled")
        ]
        mem = peak_memory_mib(prepares, device, args.threads)
        ips = [throughput(args, mode, n) for mode in ("mdeq", "unrolled")]
        rows.append([n, ips[0], ips[1], ips[0] / ips[1], mem[0], mem[1], _ratio(mem[1], mem[0])])
        print(f"N={n} done", file=sys.stderr, flush=True)

    load = f", load average {os.getloadavg()[1]:.1f}" if hasattr(os, "getloadavg") else ""
    cmd = "python bench/segmentation.py " + " ".join(sys.argv[1:])
    print(f"## Segmentation benchmark (`{cmd.strip()}`)\n")
    print(
        f"torch {torch.__version__}, {device} ({platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs{load}), {args.threads} thread(s); model of "
        f"experiment={args.experiment}, batch {args.batch} of {args.size[0]}x{args.size[1]}.\n"
    )
    print(
        markdown_table(
            [
                "N",
                "MDEQ img/s",
                "unrolled img/s",
                "speed ratio",
                "MDEQ peak MiB",
                "unrolled peak MiB",
                "memory unrolled/MDEQ",
            ],
            rows,
        )
    )
    print(
        "\nMDEQ: N solver iterations forward, implicit backward (at most N iterations). "
        "unrolled: backprop through N applications of f. speed ratio: MDEQ / unrolled "
        "images per second (above 1: MDEQ faster)."
    )
    if args.train:
        r = train_target("seg_tiny", args.threads)
        print(
            f"\n### Target: experiment=seg_tiny ({args.threads} thread(s))\n\n"
            f"wall time {r['wall_s'] / 60:.1f} min (imports, data, 3 epochs, validation, test); "
            f"test/miou {r['test/miou']:.3f}, val/miou {r['val/miou']:.3f}, "
            f"test/pixel_acc {r['test/pixel_acc']:.3f}."
        )


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


if __name__ == "__main__":
    main()
