"""bench/flow.py --peer: DEQ-Flow and RAFT trained side by side on the same pairs, reported."""

import importlib.util
import json
import subprocess
import sys

import pytest

from tests.helpers.app import ROOT


@pytest.fixture
def flow_bench(monkeypatch):
    """bench/flow.py as a module (it imports its neighbours from bench/)."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_flow", ROOT / "bench" / "flow.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peer_takes_the_deq_levels_and_budgets_from_the_experiment(flow_bench):
    model, solver, _ = flow_bench.model_config("flow_tiny", "phantom")
    overrides = dict(o.split("=", 1) for o in flow_bench.peer_overrides("raft_small", "flow_tiny"))
    assert overrides["model"] == "raft_small"
    assert int(overrides["model.corr_levels"]) == model["corr_levels"]
    assert int(overrides["model.num_iters"]) == solver["max_iter"]
    assert int(overrides["model.eval_iters"]) == solver["eval_opts"]["max_iter"]


@pytest.mark.slow
def test_peer_quick_trains_both_sides_on_the_same_pairs_and_reports(tmp_path, run_env):
    out, runs = tmp_path / "flow", tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "flow.py"), "--peer", "raft_small", "--quick",
         f"--out={out}", f"--runs={runs}"],
        env={**run_env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((out / "results.json").read_text())
    deq, raft = result["rows"]
    assert (deq["name"], raft["name"]) == ("deq_flow", "raft_small")
    assert result["same_training_pairs"] is True  # checksums of the training flows agree
    assert deq["data_checksum"] > 0
    for row in (deq, raft):
        assert row["test/epe"] > 0 and row["test/epe_zero"] > 0 and row["cpu_s"] > 0
        assert row["step_peak_mib"] > 0 and row["params"] > 0
        assert row["test/epe_vs_zero"] == pytest.approx(row["test/epe"] / row["test/epe_zero"])
        assert len(row["history"]["val/epe"]) >= 2  # a learning curve, not one point
    # The same validation pairs: the zero flow scores the same on both sides.
    assert deq["val/epe_zero"] == pytest.approx(raft["val/epe_zero"])
    assert 0.0 <= deq["converged_fraction"] <= 1.0 and raft["converged_fraction"] is None
    assert raft["params"] != deq["params"]
    assert len(result["load_average_start"]) == 3 and result["threads"] == 1
    report = (out / "report.md").read_text()
    assert "| deq_flow" in report and "| raft_small" in report
    assert (out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
