"""bench/_common.py's commit stamp: what marks a measurement as taken on uncommitted code."""

import subprocess
import sys
from pathlib import Path

from tests.helpers.app import ROOT

sys.path.insert(0, str(ROOT / "bench"))
from _common import git_commit


def _git(repo: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_commit_stamp_is_dirty_for_code_changes_but_not_for_reports(tmp_path: Path):
    repo = tmp_path / "repo"
    (repo / "reports").mkdir(parents=True)
    (repo / "model.py").write_text("width = 1\n")
    (repo / "reports" / "results.json").write_text("{}\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "start")
    head = _git(repo, "rev-parse", "HEAD")
    assert git_commit(repo) == head
    # A benchmark rewriting its report (or another seed's) leaves the code at HEAD ...
    (repo / "reports" / "results.json").write_text('{"epe": 1.0}\n')
    assert git_commit(repo) == head
    # ... a change to the code does not.
    (repo / "model.py").write_text("width = 2\n")
    assert git_commit(repo) == f"{head}+dirty"
    assert git_commit(tmp_path) is None  # not a checkout
