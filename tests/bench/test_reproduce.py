"""The reproduction report runs end to end on its minimal setting."""

import json
import subprocess
import sys

import pytest

from tests.helpers.app import ROOT


@pytest.mark.slow
def test_reproduce_quick_writes_report_and_plots(tmp_path, run_env):
    out = tmp_path / "repro"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "reproduce.py"),
            "--quick",
            "--threads=1",
            f"--out={out}",
            "--tasks",
            "digits",
            "--memory-experiments",
            "cls_digits",
        ],
        env=run_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = (out / "report.md").read_text()
    for section in ("## 1. Constant memory", "## 2. Jacobian regularization", "## 3. Solvers"):
        assert section in report
    for png in ("memory.png", "jacobian.png", "solvers.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    results = json.loads((out / "results.json").read_text())
    (n_small, deq_small, unrolled_small, *_), (n, deq, unrolled, *_) = results["memory"][
        "cls_digits"
    ]
    assert n > n_small and unrolled > deq  # backprop through N steps keeps N steps' activations
    assert unrolled - unrolled_small > deq - deq_small  # and grows faster with N than the DEQ
    curves = results["solvers"]["digits"]["curves"]
    assert set(curves) == {"fixed_point", "anderson", "broyden"}
    assert all(0.0 <= metric <= 1.0 for curve in curves.values() for _, _, metric in curve)
    plain = results["jr"]["digits"]["plain"]
    assert plain["history"] and all(1 <= nstep <= 40 for _, nstep in plain["history"])
    made = results["inputs"]["jr/digits/plain"]
    assert made["command"].startswith("OMP_NUM_THREADS=1 python train.py experiment=cls_digits")
    assert made["reused"] is False and not results["inputs"]["memory/cls_digits"]["reused"]


def test_earlier_runs_are_used_only_with_reuse(tmp_path):
    """A run left in --out by an earlier call is refused unless --reuse, and then reported as
    reused with the command that made it (read back from the run)."""
    sys.path.insert(0, str(ROOT / "bench"))
    from reproduce import train_run

    run_dir = tmp_path / "runs" / "digits_plain"
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.json").write_text("{}")
    with pytest.raises(FileExistsError, match="--reuse"):
        train_run("digits", False, tmp_path, True, 1, reuse=False)
    made_by = {"command": "OMP_NUM_THREADS=1 python train.py experiment=cls_digits", "commit": "c"}
    (run_dir / "made_by.json").write_text(json.dumps(made_by))
    assert train_run("digits", False, tmp_path, True, 1, reuse=True) == (
        run_dir,
        {**made_by, "reused": True},
    )
