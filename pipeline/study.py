"""A study: every recipe of a folder run one after another, then one report over their run directories.

`spikedistill study recipes/study --out docs/results` runs each `recipes/study/*.yaml` (files starting with
"_" are shared bases, not arms) in its own `spikedistill run` process, in name order, then writes the
leaderboard (table, JSON, plots incl. learning curves and token efficiency) for their runs directory into
--out. Every arm is an ordinary resumable run: rerunning the command skips finished stages and resumes an
interrupted one from its last checkpoint, so an interrupted study continues where it stopped.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from pipeline.errors import ConfigError, PipelineError


def study_recipes(folder: str | Path, only: list[str] | None = None) -> list[Path]:
    """The arm recipes of a study folder (sorted; `_*.yaml` bases left out), optionally only the named ones."""
    root = Path(folder)
    if not root.is_dir():
        raise ConfigError(f"{folder}: not a folder of recipes (e.g. recipes/study)")
    arms = sorted(p for p in root.glob("*.yaml") if not p.name.startswith("_"))
    if not arms:
        raise ConfigError(f"{folder}: no *.yaml recipes found (files starting with '_' are bases, not arms)")
    if only:
        by_stem = {p.stem: p for p in arms}
        unknown = [name for name in only if name not in by_stem]
        if unknown:
            raise ConfigError(f"--only: no recipe {', '.join(unknown)} in {folder}; arms are "
                              f"{', '.join(by_stem)}")
        arms = [by_stem[name] for name in only]
    return arms


def runs_dir_of(recipes: list[Path], overrides: list[str] | None = None) -> Path:
    """The one runs directory the arms write to (run.runs_dir); arms that disagree are an error."""
    from pipeline.recipe import load_recipe

    dirs = {Path(load_recipe(p, overrides or []).run.runs_dir) for p in recipes}  # also validates every recipe up front
    if len(dirs) != 1:
        raise ConfigError(f"run.runs_dir: the arms of a study must share one runs directory, got "
                          f"{', '.join(sorted(map(str, dirs)))}; set it in the shared base recipe")
    return dirs.pop()


def run_study(folder: str | Path, out_dir: str | Path | None = None, only: list[str] | None = None,
              report_only: bool = False, overrides: list[str] | None = None) -> dict:
    """Run the arms (each `python -m pipeline run RECIPE`), then build the report; returns its files."""
    from eval.leaderboard import build_leaderboard

    arms = study_recipes(folder, only)
    runs = runs_dir_of(arms, overrides)
    if not report_only:
        for i, recipe in enumerate(arms, 1):
            print(f"\n=== study arm {i}/{len(arms)}: {recipe} ===", flush=True)
            t0 = time.perf_counter()
            cmd = [sys.executable, "-m", "pipeline", "run", str(recipe), *(overrides or [])]
            code = subprocess.run(cmd, check=False, env=os.environ.copy()).returncode
            if code != 0:
                raise PipelineError(f"{recipe}: the arm failed (exit {code}, its error is above); fix it and "
                                    "rerun the study, which skips the arms and stages already done")
            print(f"=== {recipe.stem}: {time.perf_counter() - t0:.0f} s ===", flush=True)
    return build_leaderboard(runs, out_dir or runs / "leaderboard")
