"""bench/equilibrium.py runs end to end on a smoke setting and writes what it promises."""

import json
import subprocess
import sys

import pytest

from tests.helpers.app import ROOT


@pytest.mark.slow
def test_equilibrium_bench_quick_writes_results_report_and_plot(tmp_path, run_env):
    out = tmp_path / "eq"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "equilibrium.py"),
            "--quick",
            "--threads=1",
            f"--out={out}",
            "--families",
            "digits",
        ],
        env=run_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads((out / "results.json").read_text())
    assert [(r["family"], r["model"]) for r in rows] == [("digits", "deq"), ("digits", "layered")]
    required = {"family", "model", "metric", "value", "params", "converged_fraction", "cpu_s"}
    for row in rows:
        assert required <= set(row) and row["metric"] == "test/acc"
        assert 0.0 <= row["value"] <= 1.0 and row["cpu_s"] > 0 and row["step_peak_mib"] > 0
    deq, layered = rows
    assert 0.0 <= deq["converged_fraction"] <= 1.0 and layered["converged_fraction"] is None
    assert abs(layered["params"] / deq["params"] - 1) < 0.03  # the twin is sized to the DEQ
    assert deq["history"]["val/fwd_converged"]  # the equilibrium over training, from the log
    report = (out / "report.md").read_text()
    assert "| digits | deq" in report and "| digits | layered" in report
    assert (out / "digits.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    runs = sorted(p.name for p in (out / "runs").iterdir() if p.is_dir())
    assert runs == ["digits_deq", "digits_layered"]
