"""bench/thesis_scale.py: the activation ledger counts what autograd saves, and --quick writes
the report it promises (shrunk models: the pipeline, not a measurement)."""

import json
import subprocess
import sys

import torch
from torch import nn

from deq_lightning.deq.norm import weight_norm
from tests.helpers.app import ROOT

sys.path.insert(0, str(ROOT / "bench"))
from thesis_scale import ActivationLedger

KEYS = {"system", "config", "batch", "deq_peak_mib", "explicit_peak_mib", "thesis_ratio"}


def test_ledger_counts_saved_storages_once_and_by_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    ledger = ActivationLedger(model)
    x = torch.randn(5, 8)
    with ledger.recording():
        model(x).sum().backward()
    by_module, derived = ledger.split(model)
    ledger.close()
    # Linear 0 saves its input, ReLU its output; Linear 2's input is that same storage.
    assert by_module == {"0": 5 * 8 * 4, "1": 5 * 16 * 4}
    assert derived == 0


def test_ledger_ignores_no_grad_and_separates_weight_norm_copies():
    layer = weight_norm(nn.Linear(8, 32))
    ledger = ActivationLedger(nn.Sequential(layer))
    x = torch.randn(3, 8, requires_grad=True)
    with ledger.recording():
        with torch.no_grad():
            layer(x)
        assert ledger.split(layer)[0] == {}
        layer(x).sum().backward()
    by_module, derived = ledger.split(nn.Sequential(layer))
    ledger.close()
    assert derived == 32 * 8 * 4  # the normalised weight, recomputed in this forward
    assert sum(by_module.values()) >= 3 * 8 * 4  # at least the input


def test_quick_run_writes_report(tmp_path, run_env):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "thesis_scale.py"), "--quick",
         "--systems", "wt103", "flow_B_chairs", "--out", str(tmp_path)],
        env=run_env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads((tmp_path / "thesis_scale.json").read_text())
    assert [r["key"] for r in rows] == ["wt103", "flow_B_chairs"]
    for r in rows:
        assert set(r) >= KEYS
        assert r["batch"] == 2  # --quick's batch
        assert r["deq_activation_mib"] > 0 and r["explicit_activation_mib"] > 0
        assert r["deq_peak_mib"] is None or r["deq_peak_mib"] >= 0
        assert r["deq"]["fwd_steps"] >= 1 and r["deq"]["step_s"] > 0
    assert rows[0]["deq"]["solver_budget"]["forward"] == 8  # --max-iter caps the LM
    assert rows[1]["thesis_ratio"] == 4.0 and rows[1]["target_ratio"] == 4.0
    meta = json.loads((tmp_path / "thesis_scale_meta.json").read_text())
    assert meta["quick"] and meta["omp_num_threads"] is not None
    text = (tmp_path / "thesis_scale.md").read_text()
    assert "shrunk models, not a measurement" in text and "| DEQ-Flow-B vs RAFT" in text
