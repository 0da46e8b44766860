"""One-shot GPU report: each thesis config at real size, a few hundred bf16-mixed training steps.

    python bench/gpu.py                        # on a CUDA machine: <= 8 min, writes reports/gpu.*
    OMP_NUM_THREADS=1 python bench/gpu.py      # without CUDA: a dry CPU pass on shrunk configs
    python bench/gpu.py --systems wt103 --steps 300 --case-budget 60

Every model of ``bench/thesis_scale.py``'s pairs (DEQ-Transformer and its Transformer-XL twin on
WT103, MDEQ-small and its layered twin on Cityscapes and ImageNet, DEQ-Flow-B/H and RAFT) is
built from its experiment config with ``trainer.precision=bf16-mixed`` and trained by a
Lightning ``Trainer`` (that precision, the experiment's gradient clipping, optimizer and
schedule, one device) on one synthetic batch of the real shape, repeated; the task's
``training_step`` and DEQ schedule are the real ones (``task.pretrain_steps=0``: DEQ mode from
the first step). Each model runs in a fresh process, at most ``--steps`` steps or
``--case-budget`` seconds of training, whichever comes first. Reported per model:

* throughput after ``--warmup`` steps: tokens/s (language model) or images/s (image pairs for
  flow), from the wall time of each step, the device synchronised;
* peak GPU memory (``torch.cuda.max_memory_allocated``: weights, gradients, optimizer state and
  activations; the DEQ-vs-explicit ratio of each pair is read on it);
* forward / backward solver steps per training step (the logged ``train/fwd_steps`` and
  ``train/bwd_steps`` epoch means).

Without CUDA the same pipeline runs on the CPU on ``thesis_scale``'s shrunk (``--quick``)
models for ``--steps 3`` in one process (the plumbing, not a measurement), and the report says
that it was not run on a GPU. Writes ``<out>/gpu.json`` and ``<out>/gpu.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from _common import MIB, fmt, git_commit, markdown_table
from thesis_scale import PAIRS, Case, build_task, compose_case, make_batch, measuring_pool, shrink

ROOT = Path(__file__).resolve().parents[1]
# The thesis's per-GPU batch of each system (the experiment configs' global batch over their
# devices; the DEQ paper's memory benchmark for WT103).
GPU_BATCH = {"lm": 15, "seg": 3, "cls": 32, "flow": 6}
FLOW_H_BATCH = 3  # deq_flow_*_things: 6 pairs over 2 devices


def gpu_case(case: Case) -> Case:
    """A thesis-scale case at the per-GPU batch of its experiment."""
    batch = GPU_BATCH[case.family]
    if case.family == "flow" and "things" in case.experiment:
        batch = FLOW_H_BATCH
    return Case(case.family, case.experiment, case.overrides, batch, case.shape)


class _Meter:
    """Wall time of each training step (device synchronised) and the steps done."""

    def __init__(self, device: torch.device, budget_s: float) -> None:
        self.device, self.budget_s = device, budget_s
        self.times: list[float] = []
        self._start = 0.0
        self._began = 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def callback(self) -> Any:
        import pytorch_lightning as pl

        meter = self

        class Meter(pl.Callback):
            def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
                meter._began = time.perf_counter()

            def on_train_batch_start(self, trainer: Any, module: Any, batch: Any, i: int) -> None:
                meter._sync()
                meter._start = time.perf_counter()

            def on_train_batch_end(self, trainer: Any, module: Any, *args: Any) -> None:
                meter._sync()
                now = time.perf_counter()
                meter.times.append(now - meter._start)
                if now - meter._began > meter.budget_s:
                    trainer.should_stop = True

        return Meter()


class _Repeat(torch.utils.data.Dataset):
    """The same ready-made batch ``n`` times (no data loading in the measurement)."""

    def __init__(self, batch: Any, n: int) -> None:
        self.batch, self.n = batch, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        return self.batch


def train_case(
    case: Case, steps: int, budget_s: float, warmup: int, threads: int
) -> dict[str, Any]:
    """Train one case with bf16-mixed for up to ``steps`` steps; its throughput and memory."""
    import pytorch_lightning as pl

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*(LeafSpec|isinstance.*treespec).*")
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    cfg = compose_case(case, ("trainer.precision=bf16-mixed",))
    torch.manual_seed(0)
    task = build_task(cfg)
    batch = make_batch(case.family, cfg, case.batch, case.shape)
    loader = torch.utils.data.DataLoader(_Repeat(batch, steps), batch_size=None)
    meter = _Meter(device, budget_s)
    trainer = pl.Trainer(
        accelerator="gpu" if cuda else "cpu",
        devices=1,
        precision=cfg.trainer.precision,
        gradient_clip_val=cfg.trainer.get("gradient_clip_val"),
        max_steps=steps,
        max_epochs=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=[meter.callback()],
    )
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    trainer.fit(task, train_dataloaders=loader)
    timed = meter.times[warmup:] or meter.times
    per_step = sum(timed) / len(timed)
    items = case.batch * (case.shape[0] if case.family == "lm" else 1)
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    return {
        "case": case.key,
        "system_family": case.family,
        "model": cfg.model._target_.rsplit(".", 1)[-1],
        "batch": case.batch,
        "shape": list(case.shape),
        "precision": str(cfg.trainer.precision),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
        "steps": len(meter.times),
        "step_s": per_step,
        "unit": "tokens/s" if case.family == "lm" else "images/s",
        "throughput": items / per_step,
        "peak_mib": torch.cuda.max_memory_allocated() / MIB if cuda else None,
        "process_max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "fwd_steps": _metric(metrics, "train/fwd_steps"),
        "bwd_steps": _metric(metrics, "train/bwd_steps"),
        "loss": _metric(metrics, "train/loss"),
        "params": sum(p.numel() for p in task.parameters()),
    }


def _metric(metrics: dict[str, float], name: str) -> float | None:
    for key in (f"{name}_epoch", name, f"{name}_step"):
        if key in metrics:
            return metrics[key]
    return None


def run_all(args: argparse.Namespace, dry: bool) -> list[dict]:
    """Each pair's DEQ and explicit model, each case once, in fresh processes (dry: one)."""
    measured: dict[str, dict] = {}
    rows = []
    with ExitStack() as stack:
        shared = stack.enter_context(measuring_pool()) if dry else None
        for name in args.systems:
            pair = PAIRS[name]
            sides = []
            for case in (pair.deq, pair.explicit):
                case = shrink(case) if dry else gpu_case(case)
                if case.key not in measured:
                    print(f"[gpu] {case.key}", file=sys.stderr, flush=True)
                    call = (case, args.steps, args.case_budget, args.warmup, args.threads)
                    if shared is not None:
                        measured[case.key] = shared.apply(train_case, call)
                    else:
                        with measuring_pool() as pool:
                            measured[case.key] = pool.apply(train_case, call)
                sides.append(measured[case.key])
            deq, explicit = sides
            ratio = (
                explicit["peak_mib"] / deq["peak_mib"]
                if deq["peak_mib"] and explicit["peak_mib"]
                else None
            )
            rows.append(
                {
                    "system": pair.system,
                    "key": name,
                    "config": pair.deq.experiment,
                    "explicit": pair.explicit_name,
                    "deq": deq,
                    "explicit_run": explicit,
                    "memory_ratio": ratio,
                    "thesis_ratio": pair.thesis_ratio,
                    "thesis_note": pair.thesis_note,
                }
            )
    return rows


def write_report(rows: list[dict], out: Path, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    table_rows = []
    for r in rows:
        for label, m in (("DEQ", r["deq"]), (r["explicit"], r["explicit_run"])):
            table_rows.append(
                [
                    r["system"] if label == "DEQ" else "",
                    label,
                    m["batch"],
                    m["steps"],
                    f"{m['throughput']:.4g} {m['unit']}",
                    fmt(m["peak_mib"], ".0f"),
                    f"{fmt(m['fwd_steps'], '.1f')} / {fmt(m['bwd_steps'], '.1f')}",
                    (f"{r['memory_ratio']:.2f}x" if r["memory_ratio"] else "n/a")
                    if label == "DEQ"
                    else "",
                ]
            )
    table = markdown_table(
        [
            "system",
            "model",
            "batch",
            "steps",
            "throughput",
            "peak GPU MiB",
            "solver steps fwd / bwd",
            "memory explicit / DEQ",
        ],
        table_rows,
    )
    status = (
        f"Run on {meta['device']}."
        if meta["cuda"]
        else "**Not yet run on a GPU.** This is the dry CPU pass (no CUDA here): the thesis "
        "configs shrunk to tiny widths and inputs, a few steps each, in one process; it checks "
        "the pipeline, and its numbers measure nothing. Run `python bench/gpu.py` on a CUDA "
        "machine to replace this file."
    )
    text = f"""# GPU report: the thesis's configs at real size, bf16-mixed

{status}

Command: `{meta["command"]}` ({meta["when"]}; torch {meta["torch"]}, {meta["threads"]} CPU
thread(s), load average {meta["load_before"]:.1f} before, {meta["load_after"]:.1f} after; total
{meta["wall_s"]:.0f} s). Each model: its experiment config with `trainer.precision=bf16-mixed`,
`task.pretrain_steps=0`, one synthetic batch of the real shape repeated, at most {meta["steps"]}
steps or {meta["case_budget"]:.0f} s, throughput over the steps after the first {meta["warmup"]}.
Peak memory: `torch.cuda.max_memory_allocated` (weights, gradients, optimizer state,
activations). Solver steps: the epoch means of `train/fwd_steps` and `train/bwd_steps`.

{table}
"""
    (out / "gpu.md").write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--systems", nargs="+", choices=sorted(PAIRS), default=list(PAIRS))
    ap.add_argument("--steps", type=int, default=None, help="per model (GPU 300, dry 3)")
    ap.add_argument("--case-budget", type=float, default=30.0, help="training seconds per model")
    ap.add_argument("--warmup", type=int, default=None, help="steps left out (GPU 10, dry 1)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=ROOT / "reports")
    ap.add_argument("--dry", action="store_true", help="the CPU dry pass even with CUDA")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and not args.dry
    args.steps = args.steps or (300 if cuda else 3)
    args.warmup = args.warmup if args.warmup is not None else (10 if cuda else 1)
    load_before, start = os.getloadavg()[0], time.perf_counter()
    rows = run_all(args, dry=not cuda)
    meta = {
        "command": "python bench/gpu.py " + " ".join(sys.argv[1:]),
        "commit": git_commit(),
        "when": time.strftime("%Y-%m-%d %H:%M"),
        "cuda": cuda,
        "device": torch.cuda.get_device_name() if cuda else f"cpu ({platform.machine()})",
        "torch": torch.__version__,
        "threads": args.threads,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_before": load_before,
        "load_after": os.getloadavg()[0],
        "steps": args.steps,
        "warmup": args.warmup,
        "case_budget": args.case_budget,
        "wall_s": time.perf_counter() - start,
    }
    write_report(rows, args.out, meta)
    print(f"[gpu] wrote {args.out / 'gpu.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
