"""Measurement tools shared by the benchmarks: counted f, timing, peak memory, Markdown tables,
and one training run through ``train.py`` in a fresh process (metrics, CPU, history, parameters).

Every number a benchmark prints comes from one of these, so that our code and a baseline are
measured by the same instrument in the same run.
"""

from __future__ import annotations

import contextlib
import csv
import ctypes
import functools
import gc
import json
import multiprocessing as mp
import os
import random
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torch import Tensor

MIB = 2**20
ROOT = Path(__file__).resolve().parents[1]


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


def git_commit(root: Path = ROOT) -> str | None:
    """The commit the measured code is at (``None`` outside a git checkout), with ``+dirty`` when
    tracked files differ from it: ``bench/readme.py`` marks figures older than their code by it.
    Files under ``reports/`` do not count: they are what benchmarks write, so seeds run side by
    side would otherwise mark each other dirty."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", ".", ":!reports"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


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


# ----------------------------------------------------------------------------------------------
# Running and reading one training run
# ----------------------------------------------------------------------------------------------


def run_train(overrides: list[str], run_dir: Path, threads: int) -> dict:
    """``train.py <overrides>`` in a fresh process; its metrics, CPU and wall time, peak RSS."""
    if run_dir.exists():
        raise FileExistsError(f"{run_dir} exists: runs are never reused; remove it or use --out")
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "offline"}
    args = [
        sys.executable,
        str(ROOT / "train.py"),
        *overrides,
        "logger=csv",
        "trainer.enable_progress_bar=false",
        f"hydra.run.dir={run_dir}",
    ]
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        start = time.perf_counter()
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # the child's own CPU time and peak RSS
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        tail = (run_dir.parent / f"{run_dir.name}.log").read_text()[-3000:]
        raise RuntimeError(f"train.py {' '.join(overrides)} failed:\n{tail}")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    return {
        "metrics": metrics,
        "cpu_s": usage.ru_utime + usage.ru_stime,
        "wall_s": wall,
        "max_rss_mib": usage.ru_maxrss / 1024,
    }


def history(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """(step, value) series of the run's epoch-level metrics, from its CSV log."""
    files = sorted(run_dir.glob("csv/**/metrics.csv"))
    series: dict[str, list[tuple[int, float]]] = {}
    for path in files:
        with open(path, newline="") as fh:
            for row in csv.DictReader(fh):
                for key, value in row.items():
                    if value and key not in ("epoch", "step") and not key.endswith("_step"):
                        name = key.removesuffix("_epoch")
                        series.setdefault(name, []).append((int(row["step"]), float(value)))
    return series


def count_params(run_dir: Path) -> int:
    """Parameters of the trained model, each tensor once (a tied embedding and softmax share one:
    ``torch.load`` keeps the storage sharing that ``state_dict`` lists twice)."""
    ckpt = next(iter(sorted((run_dir / "checkpoints").glob("*.ckpt"))))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    seen: dict[int, int] = {}
    for k, v in state.items():
        if k.startswith("model.") and _is_param(k):
            seen[v.untyped_storage().data_ptr()] = v.numel()
    return sum(seen.values())


def _is_param(key: str) -> bool:
    # Batch-norm statistics are buffers, not parameters.
    return not key.endswith(("running_mean", "running_var", "num_batches_tracked"))


def prepare_train_step(run_dir: str, threads: int) -> callable:
    """One training step of the run's task in DEQ mode (no pre-training, no Jacobian term) on
    its first training batch, ready to run (for :func:`peak_memory_mib`)."""
    import hydra

    from deq_lightning.config import register_schemas

    register_schemas()
    torch.manual_seed(0)
    random.seed(0)
    cfg = OmegaConf.load(Path(run_dir) / ".hydra" / "config.yaml")
    cfg.paths.output_dir = run_dir
    dm = hydra.utils.instantiate(cfg.data, _convert_="all")
    dm.setup("fit")
    task = hydra.utils.instantiate(cfg.task, _recursive_=False)
    task.build_for(dm)
    task.schedule.pretrain_steps = 0
    task.schedule.jac_loss_weight = 0.0
    task.train()
    # The step runs without a Trainer: its metric logging is a no-op, not a problem.
    warnings.filterwarnings("ignore", message=r".*self\.log\(\).*trainer.*")
    batch = next(iter(dm.train_dataloader()))

    def step() -> None:
        task.zero_grad(set_to_none=True)
        loss = task.training_step(batch, 0)
        loss.backward()

    return step


def step_peak_mib(run_dir: Path, threads: int) -> float | None:
    prepare = functools.partial(prepare_train_step, str(run_dir), threads)
    return peak_memory_mib([prepare], torch.device("cpu"), threads)[0]


def train_target(
    experiment: str, threads: int, overrides: Sequence[str] = (), run_dir: Path | None = None
) -> dict:
    """``train.py experiment=<experiment> [overrides]`` in a fresh process: wall and CPU time,
    peak RSS and final metrics. ``run_dir`` keeps the run there (it must not exist); by default
    it goes to a temporary directory."""
    with tempfile.TemporaryDirectory() as tmp:
        where = run_dir if run_dir is not None else Path(tmp) / "run"
        res = run_train([f"experiment={experiment}", *overrides], where, threads)
    costs = {k: res[k] for k in ("wall_s", "cpu_s", "max_rss_mib")}
    return {**costs, **res["metrics"]}
