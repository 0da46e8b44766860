"""Measurement tools shared by the benchmarks: counted f, timing, peak memory, Markdown tables.

Every number a benchmark prints comes from one of these, so that our code and a baseline are
measured by the same instrument in the same run.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor

MIB = 2**20


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Probe:
    """Wraps f to count its forward calls, the time spent inside it and its backward passes.

    Forward calls and time are counted in Python around f, so a solver cannot hide evaluations.
    Backward passes are counted by an identity on f's output whose backward ticks: every VJP
    through f (an adjoint solver step, or the final pass to the parameters) goes through it.
    """

    def __init__(self, f: Callable[[Tensor], Tensor], device: torch.device) -> None:
        self.f, self.device = f, device
        self.reset()

    def reset(self) -> None:
        self.calls, self.seconds, self.backward_passes = 0, 0.0, 0

    def __call__(self, z: Tensor) -> Tensor:
        sync(self.device)
        start = time.perf_counter()
        out = self.f(z)
        sync(self.device)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return _Tick.apply(out, self) if out.requires_grad else out


class _Tick(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, probe: Probe) -> Tensor:
        ctx.probe = probe
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:
        ctx.probe.backward_passes += 1
        return grad, None


def timed(
    fn: Callable[[], object], device: torch.device, repeats: int, budget_s: float = 3.0
) -> tuple[list[float], object]:
    """Wall times of up to ``repeats`` runs of ``fn()`` (fewer once ``budget_s`` is spent).

    Returns the times in seconds and the result of the last run.
    """
    times, result = [], None
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        result = fn()
        sync(device)
        times.append(time.perf_counter() - start)
        if sum(times) > budget_s:
            break
    return times, result


# ----------------------------------------------------------------------------------------------
# Peak memory
# ----------------------------------------------------------------------------------------------

Prepare = Callable[[], Callable[[], object]]


def peak_memory_mib(
    prepares: Sequence[Prepare], device: torch.device, threads: int
) -> list[float | None]:
    """Peak memory (MiB) of each case above the memory in use once the case is set up.

    ``prepares[i]()`` builds case i (model, inputs, solver) and returns the run to measure. The
    run is made once unmeasured and then measured: the steady-state peak of a step, without the
    one-time costs of a first call (library code paged in, kernel caches) that every case pays.
    Each element must be picklable (a ``functools.partial`` of a module-level function): the cases
    run in one fresh spawned process, apart from everything the caller has allocated.

    CPU: the process's peak resident set size (VmHWM) is reset to the current one after set-up
    (Linux ``/proc/self/clear_refs``), and the case's peak is VmHWM minus the resident size at
    that moment. glibc is told to return every allocation above 64 KiB to the system at ``free``
    (``MALLOC_MMAP_THRESHOLD_``), so memory freed by one case or by set-up is not silently reused
    by the next. CUDA: ``torch.cuda.max_memory_allocated`` above the allocated memory after
    set-up. ``None`` where the platform offers neither (no /proc).
    """
    env = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        ctx = mp.get_context("spawn")
        with ctx.Pool(1) as pool:
            return pool.apply(_measure_all, (list(prepares), str(device), threads))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _measure_all(prepares: list[Prepare], device: str, threads: int) -> list[float | None]:
    torch.set_num_threads(threads)
    dev = torch.device(device)
    return [_measure_one(prepare, dev) for prepare in prepares]


def _measure_one(prepare: Prepare, device: torch.device) -> float | None:
    run = prepare()
    run()  # unmeasured: lazy one-time costs (library code paged in, kernel caches) are set-up
    _release()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    elif _reset_peak_rss():
        base = _proc_status_kib("VmRSS") * 1024
        run()
        peak = _proc_status_kib("VmHWM") * 1024 - base
    else:
        return None
    del run
    _release()
    return peak / MIB


def _release() -> None:
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # glibc only
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


# ----------------------------------------------------------------------------------------------
# Numbers and tables
# ----------------------------------------------------------------------------------------------


def rel_err(a: Sequence[Tensor], b: Sequence[Tensor]) -> tuple[float, float]:
    """``||a - b|| / ||b||`` over all tensors together, and the worst single tensor's."""
    a64 = [t.detach().double().cpu().flatten() for t in a]
    b64 = [t.detach().double().cpu().flatten() for t in b]
    whole = (torch.cat(a64) - torch.cat(b64)).norm() / torch.cat(b64).norm()
    worst = max(((x - y).norm() / y.norm().clamp_min(1e-300)).item() for x, y in zip(a64, b64))
    return whole.item(), worst


def fmt(v: object, spec: str = ".3g") -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return format(v, spec)
    return str(v)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(headers), sep, *(line(r) for r in cells)])


def train_target(experiment: str, threads: int) -> dict:
    """``train.py experiment=<experiment>`` in a fresh process: wall time and final metrics."""
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "offline"}
        start = time.perf_counter()
        proc = subprocess.run(
            [
                sys.executable,
                str(root / "train.py"),
                f"experiment={experiment}",
                "logger=csv",
                "trainer.enable_progress_bar=false",
                f"hydra.run.dir={tmp}/run",
            ],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
        )
        wall = time.perf_counter() - start
        if proc.returncode != 0:
            raise RuntimeError(f"train.py failed:\n{proc.stderr[-3000:]}")
        metrics = json.loads((Path(tmp) / "run" / "metrics.json").read_text())
    return {"wall_s": wall, **metrics}
