"""pipeline/provenance.py: the code version every stage's done.json records."""

from __future__ import annotations

import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_code_version_is_this_checkouts_commit_and_none_outside_a_checkout(tmp_path, monkeypatch):
    import torch

    from pipeline import provenance

    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                          cwd=ROOT).stdout.strip()
    changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                             text=True, check=True, cwd=ROOT).stdout.strip() != ""
    provenance.code_version.cache_clear()
    got = provenance.code_version()
    assert (got["commit"], got["dirty"], got["torch"]) == (head, changed, torch.__version__)

    # a folder inside another checkout (a wheel in a venv under a clone) is not that checkout
    inside = ROOT / "students"
    monkeypatch.setattr(provenance, "ROOT", inside)
    provenance.code_version.cache_clear()
    assert (provenance.code_version()["commit"], provenance.code_version()["dirty"]) == (None, None)
    monkeypatch.setattr(provenance, "ROOT", tmp_path)  # no git checkout at all
    provenance.code_version.cache_clear()
    assert provenance.code_version()["commit"] is None
    monkeypatch.undo()
    provenance.code_version.cache_clear()


def test_code_markdown_counts_runs_per_commit():
    from eval.study_report import code_markdown

    records = [{"code_commit": "a" * 40, "code_dirty": False}, {"code_commit": "a" * 40, "code_dirty": False},
               {"code_commit": "b" * 40, "code_dirty": True}, {"code_commit": None, "code_dirty": None}]
    assert code_markdown(records) == ("Code that trained the runs (git commit, from each run's distill/done.json): "
                                      "aaaaaaaaaa (2 runs), bbbbbbbbbb + local changes (1 run), not recorded (1 run).")
