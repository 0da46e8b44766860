"""The README's results blocks agree with the JSON reports they are generated from."""

import importlib.util
import re
import subprocess
import sys

import pytest

from tests.helpers.app import ROOT

_spec = importlib.util.spec_from_file_location("bench_readme", ROOT / "bench" / "readme.py")
readme = sys.modules["bench_readme"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(readme)


@pytest.fixture(scope="module")
def text() -> str:
    return readme.README.read_text()


def test_readme_results_agree_with_their_json(text):
    assert readme.check(text) == []
    assert set(readme.blocks_in(text)) == set(readme.BLOCKS)


def test_a_changed_number_fails_naming_the_block_and_the_fix(text):
    start, end = readme.blocks_in(text)["flow"]
    body = text[start:end]
    row = next(line for line in body.split("\n") if line.startswith("| `deq_flow`"))
    digit = re.search(r"\d", row.split("|")[2])  # the test EPE cell
    cell_start = len("|".join(row.split("|")[:2])) + 1 + digit.start()
    changed = row[:cell_start] + str((int(digit.group()) + 1) % 10) + row[cell_start + 1 :]
    problems = readme.check(text.replace(row, changed))
    assert len(problems) == 1
    assert "'flow'" in problems[0] and "reports/flow/results.json" in problems[0]
    assert "python bench/readme.py" in problems[0]


def test_a_removed_block_fails(text):
    start, end = readme.blocks_in(text)["compaction"]
    cut = text[: start - len("<!-- results:compaction -->\n")] + text[end:].split("\n", 1)[1]
    assert any("'compaction' is missing" in p for p in readme.check(cut))


def test_the_age_line_is_not_compared(text):
    """A later commit elsewhere changes only the age line: the check must not fail on it."""
    aged = re.sub(
        rf"^{re.escape(readme.AGE_PREFIX)}.*$",
        readme.AGE_PREFIX + "0000000; the code it measures changed since (99 commits)._",
        text,
        flags=re.M,
    )
    assert aged != text and readme.check(aged) == []


def test_no_git_history_degrades_to_age_unknown(monkeypatch):
    monkeypatch.setattr(readme, "git", lambda *args: None)
    line = readme.render("compaction", True)[0]
    assert line.startswith(readme.AGE_PREFIX) and "unknown" in line


def test_solvers_json_renders_its_tables():
    doc = {
        "command": "python bench/solvers.py --out reports/solvers.json",
        "torch": "2",
        "torchdeq": None,
        "threads": 1,
        "load_average_1_5_15": [1.0, 2.0, 3.0],
        "forward": [
            {
                "problem": "attn 8x32x64",
                "solver": "ours anderson",
                "nfe": 21,
                "converged": True,
                "residual": 9e-4,
                "seconds": 0.17,
                "overhead": 0.44,
                "peak_mib": None,
            },
        ],
        "targets": [{"target": "t", "measured": "attn: 1.0x", "verdict": "met"}],
    }
    lines = readme.render_solvers(doc)
    assert "| attn 8x32x64 | ours anderson | 21 | yes | 170.0 | 44% | n/a |" in lines
    assert "| t | attn: 1.0x | met |" in lines


def test_check_command_exits_zero():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "readme.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
