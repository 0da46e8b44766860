"""bench/flow.py --peer: DEQ-Flow and RAFT trained side by side on the same pairs, reported."""

import argparse
import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from tests.helpers.app import ROOT


@pytest.fixture
def flow_bench(monkeypatch):
    """bench/flow.py as a module (it imports its neighbours from bench/)."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_flow", ROOT / "bench" / "flow.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peer_takes_the_deq_levels_and_eval_budget_from_the_experiment(flow_bench):
    model, solver, _ = flow_bench.model_config("flow_tiny", "phantom")
    overrides = dict(o.split("=", 1) for o in flow_bench.peer_overrides("raft_small", "flow_tiny"))
    assert overrides["model"] == "raft_small"
    assert int(overrides["model.corr_levels"]) == model["corr_levels"]
    assert "model.num_iters" not in overrides  # RAFT trains with its own 12 iterations
    assert int(overrides["model.eval_iters"]) == solver["eval_opts"]["max_iter"]


def test_rows_of_an_earlier_call_are_kept_only_while_their_recipe_is_current(
    tmp_path, flow_bench, capsys
):
    args = argparse.Namespace(
        experiment="flow_tiny", seed=3, quick=False, train_steps=400, val_points=8
    )
    now = flow_bench.side_overrides(args, ["raft_small"], ["hidden_96", "zero_init"])
    matching = flow_bench.MATCHING_DEQ["raft_small"][0]
    old_rows = [
        {"name": "deq_flow+hidden_96", "overrides": now["deq_flow+hidden_96"]},  # current
        {"name": "deq_flow+zero_init", "overrides": [*now["deq_flow"], "model.hidden_init=x"]},
        {"name": "deq_flow_small", "overrides": [*now["deq_flow"], "model=deq_flow_small"]},
        {"name": "raft_small", "overrides": now["raft_small"]},  # current, but run again now
    ]
    path = tmp_path / "results_seed3.json"
    doc = {"command": "earlier", "train_steps": 400, "quick": False, "rows": old_rows}
    path.write_text(json.dumps(doc))
    rows = [{"name": "deq_flow"}, {"name": matching}, {"name": "raft_small"}]
    kept = flow_bench.kept_rows(path, rows, args)
    assert [(r["name"], r["command"]) for r in kept] == [("deq_flow+hidden_96", "earlier")]
    assert "dropped rows whose recipe changed" in capsys.readouterr().err
    # Another schedule: nothing of the earlier call is comparable.
    path.write_text(json.dumps({**doc, "train_steps": 200}))
    assert flow_bench.kept_rows(path, rows, args) == []


class _Model:
    """A stand-in for deq_lightning.load's FlowEstimator: answers ``answer(pair)``."""

    def __init__(self, answer, converged):
        self.answer, self.converged = answer, converged

    def predict(self, frame1, frame2):
        return self.answer(frame1.shape[-2:])


def test_real_scores_rate_the_motorcycle_pair_against_zero_flow(flow_bench):
    from deq_lightning.datamodules.flow_real import motorcycle_pair

    truth = {
        tuple(motorcycle_pair(s).flow.shape[-2:]): motorcycle_pair(s).flow for s in (0.25, 0.5)
    }
    perfect = flow_bench.real_scores(_Model(lambda size: truth[tuple(size)], 0.5), [0.25, 0.5])
    assert [e["scale"] for e in perfect] == [0.25, 0.5]
    assert [e["size"] for e in perfect] == [[125, 185], [250, 370]]
    for e in perfect:
        assert e["real_epe"] == 0 and e["real_epe_vs_zero"] == 0 and e["real_converged"] == 0.5
    # Zero flow scores 1x; the mean motion halves with the scale (8.9 px at 0.25).
    (zero,) = flow_bench.real_scores(_Model(lambda size: torch.zeros(2, *size), None), [0.5])
    assert (
        zero["real_epe"] == pytest.approx(zero["real_epe_zero"]) and zero["real_epe_vs_zero"] == 1
    )
    assert zero["real_epe_zero"] == pytest.approx(2 * perfect[0]["real_epe_zero"], rel=0.05)
    assert zero["real_converged"] is None


def test_the_readme_flow_block_shows_the_real_pair_or_says_not_measured(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_readme_flow", ROOT / "bench" / "readme.py")
    readme = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, readme)  # its dataclass looks its module up
    spec.loader.exec_module(readme)
    row = {"name": "deq_flow", "overrides": ["experiment=flow_tiny"], "test/epe_vs_zero": 0.7,
           "val/epe_vs_zero": 0.6, "params": 10, "cpu_s": 5.0, "step_peak_mib": 2.0,
           "converged_fraction": 0.0}  # fmt: skip
    doc = {"command": "python bench/flow.py --peer raft_small", "threads": 1, "train_steps": 4,
           "load_average_start": [1.0] * 3, "load_average_end": [2.0] * 3,
           "same_training_pairs": True, "rows": [row, {**row, "name": "raft_small",
           "converged_fraction": None}]}  # fmt: skip
    old = "\n".join(readme.render_flow_peer(doc))
    assert "not measured, this JSON predates that evaluation" in old
    real = {"scale": 0.25, "size": [125, 185], "real_epe": 4.5, "real_epe_zero": 9.0,
            "real_epe_vs_zero": 0.5, "real_converged": 0.0}  # fmt: skip
    doc["rows"][0] = {**row, "real": [real]}
    new = "\n".join(readme.render_flow_peer(doc))
    assert "Motorcycle x0.25 (125x185): EPE / zero" in new
    assert "| 4.50 / 9.00 px = 0.500x, 0% converged |" in new
    assert "| not measured |" in new  # raft_small's row predates the evaluation
    assert "Middlebury 2014 stereo pair" in new
    # Every DEQ row is set against the peer (the row without a converged fraction).
    small = {**row, "name": "deq_flow_small", "test/epe_vs_zero": 0.35, "cpu_s": 10.0}
    doc["rows"].insert(1, small)
    three = "\n".join(readme.render_flow_peer(doc))
    assert "`deq_flow` / `raft_small`: test EPE 1.00x, val EPE 1.00x, CPU time 1.00x" in three
    assert "`deq_flow_small` / `raft_small`: test EPE 0.50x, val EPE 1.00x, CPU time 2.00x" in three


def test_the_readme_peer_seeds_block_shows_each_seed_and_the_mean(monkeypatch):
    spec = importlib.util.spec_from_file_location(
        "bench_readme_seeds", ROOT / "bench" / "readme.py"
    )
    readme = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, readme)
    spec.loader.exec_module(readme)

    def run(seed: int, deq: tuple[float, float], raft: tuple[float, float]) -> dict:
        rows = [
            {"name": name, "overrides": ["experiment=flow_tiny", f"seed={seed}"],
             "test/epe_vs_zero": t, "val/epe_vs_zero": v}
            for name, (t, v) in (("deq_flow", deq), ("raft_small", raft))
        ]  # fmt: skip
        return {"command": f"python bench/flow.py --peer raft_small --seed {seed}",
                "train_steps": 400, "rows": rows}  # fmt: skip

    def render(*runs: dict) -> str:
        return "\n".join(readme.render_flow_peer_seeds(*runs))

    def missing(text: str, *lines: str) -> list[str]:
        return [line for line in lines if line not in text]

    text = render(run(0, (0.8, 0.7), (0.7, 0.5)), run(3, (0.9, 0.9), (0.8, 0.6)))
    assert not missing(
        text,
        "at 2 seeds (400 steps each",
        "| 0 | 0.800 / 0.700 | 0.700 / 0.500 | `python bench/flow.py",
        "| 3 | 0.900 / 0.900 | 0.800 / 0.600 |",
        "| mean | 0.850 / 0.800 | 0.750 / 0.550 |  |",
        # Behind RAFT-small on both at both seeds.
        "| seeds at or below `raft_small` | 0 / 0 of 2 |  |  |",
    )
    assert "Means over" not in text  # these rows measured nothing else

    def costed(seed: int, deq: tuple[float, float], raft: tuple[float, float]) -> dict:
        out = run(seed, deq, raft)
        for row, cpu, real in zip(out["rows"], (10.0, 20.0), (0.4, 0.6)):
            row.update(cpu_s=cpu + seed, step_peak_mib=50.0, converged_fraction=seed / 4,
                       real=[{"scale": 0.25, "real_epe_vs_zero": real + seed / 10}])  # fmt: skip
        out["rows"][1]["converged_fraction"] = None  # RAFT has no fixed point
        return out

    # Seed 0: ahead on test, level on validation; seed 3: behind on test, ahead on validation.
    text = render(costed(0, (0.6, 0.5), (0.7, 0.5)), costed(3, (0.9, 0.5), (0.8, 0.6)))
    assert not missing(
        text,
        "| seeds at or below `raft_small` | 1 / 2 of 2 |  |  |",
        "Means over the 2 seeds:",
        "| side | Motorcycle x0.25: EPE / zero | converged (test, range) | CPU s |",
        "| `deq_flow` | 0.550 | 0%-75% | 12 | 50.0 |",
        "| `raft_small` | 0.750 | n/a | 22 | 50.0 |",
    )


@pytest.mark.slow
def test_peer_quick_trains_both_sides_on_the_same_pairs_and_reports(tmp_path, run_env, flow_bench):
    out, runs = tmp_path / "flow", tmp_path / "runs"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "flow.py"), "--peer", "raft_small", "--quick",
         f"--out={out}", f"--runs={runs}"],
        env={**run_env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((out / "results.json").read_text())
    deq, wide, raft = result["rows"]
    assert (deq["name"], wide["name"], raft["name"]) == (
        "deq_flow",
        "deq_flow_tiny_wide",
        "raft_small",
    )
    assert result["same_training_pairs"] is True  # checksums of the training flows agree
    assert deq["data_checksum"] > 0
    # The DEQ of RAFT-small's size: within 10% of its parameters, wider than the default's.
    assert {"model.size=tiny_wide", "backward.tau=1.0"} <= set(wide["overrides"])
    assert 0.9 < wide["params"] / raft["params"] < 1.0 and wide["params"] > 1.2 * deq["params"]
    # Each DEQ re-scored at four solver budgets; the evaluation budget reproduces its test/epe.
    eval_iter = flow_bench.model_config("flow_tiny", "phantom")[1]["eval_opts"]["max_iter"]
    for row in (deq, wide):
        budgets = {b["max_iter"]: b["test/epe"] for b in row["eval_budgets"]}
        assert len(budgets) == 4
        assert budgets[eval_iter] == pytest.approx(row["test/epe"], rel=1e-4)
    assert (
        "eval_budgets" not in raft
        and "deq_flow_tiny_wide` test EPE / zero at solver budgets"
        in (out / "report.md").read_text()
    )
    for row in (deq, wide, raft):
        assert row["test/epe"] > 0 and row["test/epe_zero"] > 0 and row["cpu_s"] > 0
        assert row["step_peak_mib"] > 0 and row["params"] > 0
        assert row["test/epe_vs_zero"] == pytest.approx(row["test/epe"] / row["test/epe_zero"])
        assert len(row["history"]["val/epe"]) >= 2  # a learning curve, not one point
    # The same validation pairs: the zero flow scores the same on both sides.
    assert deq["val/epe_zero"] == pytest.approx(raft["val/epe_zero"])
    assert 0.0 <= deq["converged_fraction"] <= 1.0 and raft["converged_fraction"] is None
    assert raft["params"] != deq["params"]
    # Both trained models on the real photographs, on the same pixels.
    for d, r in zip(deq["real"], raft["real"]):
        assert d["scale"] == r["scale"] and d["real_epe_zero"] == r["real_epe_zero"] > 0
        assert d["real_epe"] > 0 and 0 <= d["real_converged"] <= 1 and r["real_converged"] is None
        assert r["real_epe_vs_zero"] == pytest.approx(r["real_epe"] / r["real_epe_zero"])
    assert [e["scale"] for e in deq["real"]] == [0.25, 0.5]
    assert "Motorcycle" in result["real_pair"]
    assert len(result["load_average_start"]) == 3 and result["threads"] == 1
    report = (out / "report.md").read_text()
    assert "| deq_flow" in report and "| raft_small" in report
    assert "Motorcycle x0.25 EPE / zero" in report and " px = " in report
    assert (out / "learning_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert result["complete"] is True and "Incomplete" not in report
    # After each side the results are written as they stand: a kill in the second side keeps
    # the first, marked incomplete.
    args = argparse.Namespace(
        out=tmp_path / "partial",
        train_steps=None,
        quick=True,
        threads=1,
        experiment="flow_tiny",
        seed=0,
    )
    flow_bench.write_sides(args, "peer", "cmd", [deq], (0.0, 0.0, 0.0), complete=False)
    partial = json.loads((tmp_path / "partial" / "results.json").read_text())
    assert partial["complete"] is False and [r["name"] for r in partial["rows"]] == ["deq_flow"]
    assert "**Incomplete:**" in (tmp_path / "partial" / "report.md").read_text()
    # Another seed writes its own files and leaves seed 0's alone.
    args.seed = 3
    flow_bench.write_sides(args, "peer", "cmd", [deq, raft], (0.0, 0.0, 0.0), complete=True)
    seeded = json.loads((tmp_path / "partial" / "results_seed3.json").read_text())
    assert seeded["complete"] is True and [r["name"] for r in seeded["rows"]] == [
        "deq_flow", "raft_small"]  # fmt: skip
    assert (tmp_path / "partial" / "report_seed3.md").is_file()
    assert (tmp_path / "partial" / "learning_curve_seed3.png").is_file()
    assert json.loads((tmp_path / "partial" / "results.json").read_text())["complete"] is False


@pytest.mark.slow
def test_default_quick_writes_the_default_row(tmp_path, run_env, flow_bench):
    """bench/flow.py --default: train.py at the experiment's defaults in a fresh process, its
    scores, equilibrium and costs in default.json (--quick: a few steps, marked quick); another
    --seed adds only ``seed=N`` and writes default_seed<N>.json."""
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "flow.py"), "--default", "--quick", "--threads=1",
         "--seed=1", f"--out={tmp_path}", f"--runs={tmp_path / 'runs'}"],
        env={**run_env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not (tmp_path / "default.json").exists()
    doc = json.loads((tmp_path / "default_seed1.json").read_text())
    assert doc["quick"] is True and doc["threads"] == 1 and doc["seed"] == 1
    assert doc["run"] == "OMP_NUM_THREADS=1 python train.py experiment=flow_tiny seed=1"
    assert doc["test/epe"] > 0 and doc["test/epe_zero"] > 0
    assert 0.0 <= doc["test/fwd_converged"] <= 1.0
    assert doc["wall_s"] > 0 and doc["cpu_s"] > 0 and doc["max_rss_mib"] > 0
    # The budget sweep re-scores the tested checkpoint on the same test pairs: at the evaluation
    # budget it must reproduce train.py's test/epe.
    _, solver, _ = flow_bench.model_config("flow_tiny", "phantom")
    train_iter, eval_iter = solver["max_iter"], solver["eval_opts"]["max_iter"]
    budgets = {row["max_iter"]: row for row in doc["eval_budgets"]}
    assert sorted(budgets) == sorted({train_iter // 2, train_iter, eval_iter, 2 * eval_iter})
    assert budgets[eval_iter]["test/epe"] == pytest.approx(doc["test/epe"], rel=1e-4)
    assert all(0.0 <= row["test/fwd_converged"] <= 1.0 for row in budgets.values())
