"""bench/solvers.py --compaction runs on a smoke setting and writes the JSON it promises."""

import json
import subprocess
import sys

from tests.helpers.app import ROOT


def test_compaction_bench_quick_writes_json(tmp_path, run_env):
    out = tmp_path / "compaction.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "solvers.py"), "--compaction", "--quick",
         f"--out={out}"],
        env=run_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert [r["solver"] for r in report["rows"]] == ["anderson", "broyden", "fixed_point"]
    assert report["shared_machine"] and len(report["load_average_1_5_15"]) == 3
    for r in report["rows"]:
        assert r["converged_fraction"] == 1.0
        assert r["easy_nstep_mean"] < 0.5 * r["hard_nstep_mean"]  # a batch of mixed difficulty
        assert r["f_rows_on"] < r["f_rows_off"]  # compaction took rows out of f
        assert r["final_rel_res_max_on"] < report["tol"] and r["speedup_off_over_on"] > 0
    assert "| anderson" in proc.stdout
