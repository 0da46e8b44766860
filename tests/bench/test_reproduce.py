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
