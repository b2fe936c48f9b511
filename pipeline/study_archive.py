"""A study's finished runs as records small enough to commit, so that a study goes on across machines.

A study on a CPU takes longer than one working session, and a fresh machine (a new clone, a cluster job's
scratch disk) starts with an empty runs directory. `spikedistill study ... --archive DIR` keeps, in DIR, what
each finished run left that the study and its report read: the resolved config.yaml and, per stage, done.json,
stage.json, metrics.jsonl and attempts.jsonl, plus evaluate's results.json and energy.md. No weights, no
checkpoints, no datasets and no teacher cache: 30-40 kB per run of the study, so DIR can live in git beside
the report (`make study` uses docs/results/runs).

- restore_runs (at the start of a study): every archived run that the runs directory lacks, or holds with fewer
  finished stages, is copied into it with a restored.json marker. The study then treats it like any finished
  run: its done.json files carry the recipe's config hash, so a record made under another recipe is ignored.
- archive_runs (after each run and at the end): every run of the study that has finished its learning-rate
  sweep point (distill done, or diverged) or its last stage is copied into DIR, replacing its older copy.
- A restored run holds records only. When the study needs more of it than it finished (a sweep point whose
  rate was chosen, so it must go on to export and evaluate), StudyPlan drops it and trains it again, from the
  same seed and data order.

Raises: pipeline.errors.ConfigError when DIR exists and is not a folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.errors import ConfigError

#: What a run directory holds that the study and its report read, as glob patterns relative to it.
RECORD_PATTERNS = ("config.yaml", "*/done.json", "*/stage.json", "*/metrics.jsonl", "*/attempts.jsonl",
                   "evaluate/results.json", "evaluate/energy.md")
#: Written into a run directory that restore_runs made: its weights and checkpoints are not there.
RESTORED = "restored.json"


def _folder(archive: str | Path) -> Path:
    folder = Path(archive)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--archive {archive}: not a folder; give the folder of archived study runs "
                          "(e.g. docs/results/runs)")
    return folder


def record_files(run_dir: Path) -> list[Path]:
    """The record files of one run directory, relative to it, sorted (RECORD_PATTERNS)."""
    found = {p.relative_to(run_dir) for pattern in RECORD_PATTERNS for p in run_dir.glob(pattern) if p.is_file()}
    return sorted(found)


def _done_stages(run_dir: Path) -> set[str]:
    return {p.parent.name for p in run_dir.glob("*/done.json")}


def archive_run(run_dir: Path, archive: str | Path) -> Path:
    """Copy one run's records into <archive>/<run name>, replacing what was there; returns that folder."""
    dest = _folder(archive) / run_dir.name
    if dest.exists():
        shutil.rmtree(dest)
    for rel in record_files(run_dir):
        (dest / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(run_dir / rel, dest / rel)
    return dest


def restore_runs(archive: str | Path, runs_dir: Path, names: set[str] | None = None) -> list[str]:
    """Copy archived runs (all, or those in `names`) into `runs_dir` where it lacks them or has finished fewer
    of their stages (an interrupted local copy of a run finished elsewhere is replaced). Returns the names
    restored. A missing archive folder restores nothing."""
    folder = _folder(archive)
    if not folder.is_dir():
        return []
    restored = []
    for src in sorted(p for p in folder.iterdir() if p.is_dir()):
        if names is not None and src.name not in names:
            continue
        local = runs_dir / src.name
        # a diverged sweep point has no done.json: it is restored where the runs directory lacks the run
        if local.exists() and _done_stages(src) <= _done_stages(local):
            continue
        if local.exists():
            shutil.rmtree(local)
        for rel in record_files(src):
            (local / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src / rel, local / rel)
        (local / RESTORED).write_text(json.dumps({"from": str(src), "stages": sorted(_done_stages(src))}) + "\n")
        restored.append(src.name)
    return restored


def is_restored(run_dir: Path) -> bool:
    """The run directory holds archived records only (restore_runs), no weights or checkpoints."""
    return (run_dir / RESTORED).is_file()
