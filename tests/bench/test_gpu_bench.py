"""bench/gpu.py's dry CPU pass (no CUDA): the bf16-mixed Lightning pipeline runs every model of
the chosen pairs and writes the report, which says it was not run on a GPU."""

import json
import subprocess
import sys

from tests.helpers.app import ROOT


def test_gpu_bench_dry_pass_writes_report(tmp_path, run_env):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu.py"), "--dry",
         "--systems", "wt103", "cityscapes", "flow_B_chairs", "--out", str(tmp_path)],
        env=run_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((tmp_path / "gpu.json").read_text())
    meta, rows = report["meta"], report["rows"]
    assert not meta["cuda"] and meta["steps"] == 3 and meta["load_before"] >= 0
    assert [r["key"] for r in rows] == ["wt103", "cityscapes", "flow_B_chairs"]
    for r in rows:
        for run in (r["deq"], r["explicit_run"]):
            assert run["precision"] == "bf16-mixed"
            assert run["steps"] == 3 and run["throughput"] > 0
            assert run["peak_mib"] is None  # no GPU memory without a GPU
        assert r["deq"]["fwd_steps"] >= 1  # the DEQ logged its solver steps
        assert r["explicit_run"]["fwd_steps"] is None  # an explicit model has no solver
    assert rows[0]["deq"]["unit"] == "tokens/s" and rows[2]["deq"]["unit"] == "images/s"
    assert rows[0]["deq"]["bwd_steps"] >= 1  # implicit backward
    text = (tmp_path / "gpu.md").read_text()
    assert "Not yet run on a GPU" in text and "| DEQ-Flow-B vs RAFT" in text
