"""Lightning + task overhead on the digits task against a raw PyTorch loop doing the same DEQ step.

    python bench/lightning_overhead.py [--steps 60] [--threads 1]

Both sides train the same MDEQ (the embedded default config) on the same batches in DEQ mode
(pre-training off), with Adam, for the same number of steps; the Lightning side runs the real
ClassificationTask (metrics, DEQ stat logging) under a real Trainer, without checkpointing or
loggers. Step times are medians over the steps after a warm-up, measured around the step only.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from deq_lightning.config import register_schemas

ROOT = Path(__file__).resolve().parents[1]


def load_cfg():
    register_schemas()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(
            "train",
            overrides=["task.pretrain_steps=0", "logger=csv", "hydra.runtime.output_dir=/tmp"],
            return_hydra_config=False,
        )


class StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self.t0 = time.perf_counter()

    def on_train_batch_end(self, *args) -> None:
        self.times.append(time.perf_counter() - self.t0)


def batches(dm, steps):
    dm.setup("fit")
    out = []
    while len(out) < steps:
        out.extend(dm.train_dataloader())
    return out[:steps]


def raw_loop(cfg, data, warmup):
    torch.manual_seed(0)
    task = instantiate(cfg.task, _recursive_=False)
    model = task.model
    opt = torch.optim.Adam(model.parameters(), lr=cfg.task.optimizer.lr)
    model.train()
    times = []
    for x, y in data:
        t0 = time.perf_counter()
        logits, _ = model(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[warmup:])


def lightning_loop(cfg, data, warmup):
    torch.manual_seed(0)
    task = instantiate(cfg.task, _recursive_=False)
    timer = StepTimer()
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    trainer = pl.Trainer(
        max_steps=len(data),
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[timer],
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    trainer.fit(task, train_dataloaders=loader)
    return statistics.median(timer.times[warmup:])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_cfg()
    dm = instantiate(cfg.data, _convert_="all")
    data = batches(dm, args.steps)
    raw, lit = [], []
    for _ in range(2):  # interleave to share machine noise
        raw.append(raw_loop(cfg, data, args.warmup))
        lit.append(lightning_loop(cfg, data, args.warmup))
    raw_t, lit_t = min(raw), min(lit)
    print("| loop | median step (ms) |")
    print("| --- | --- |")
    print(f"| raw PyTorch | {raw_t * 1e3:.2f} |")
    print(f"| Lightning + ClassificationTask | {lit_t * 1e3:.2f} |")
    print(
        f"\noverhead: {100 * (lit_t / raw_t - 1):+.1f}% of the raw step time "
        f"({args.steps} steps, {args.threads} thread(s), batch {cfg.data.batch_size})"
    )


if __name__ == "__main__":
    main()
