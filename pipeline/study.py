"""A study: every recipe of a folder run (per seed), then one report over their run directories.

`spikedistill study recipes/study --out docs/results` runs each `recipes/study/*.yaml` (files starting with
"_" are shared bases, not arms) in its own `spikedistill run` process. An arm whose recipe sets
`study.seeds: [0, 1, 2]` runs once per seed, as run.name=<name>-s<seed> with run.seed=<seed>; runs go seed by
seed (every arm's first seed, in name order, then every arm's second, ...), single-run arms first. Then it
writes the leaderboard of those runs (table, JSON, plots) and the study report (eval.study_report:
summary.json with one record per run, study.md with mean +- std per arm and the goals answered, learning
curves and token efficiency with error bands) into --out.

Every run is an ordinary resumable run: rerunning the command skips finished stages and resumes an
interrupted one from its last checkpoint, so an interrupted study continues where it stopped. With
--jobs N, N runs go at once, each with cores/N threads; each shared teacher cache is built once, first in the
queue, and the runs that read it wait for it while runs without one take the other slots, so no two runs build
the same cache and no core idles while it is built.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from eval.study_report import StudyRun
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


def study_runs(recipes: list[Path], overrides: list[str] | None = None) -> tuple[Path, list[tuple[Path, StudyRun, list[str]]]]:
    """(the one runs directory, [(recipe, StudyRun, per-run overrides)]), validating every recipe up front.

    Arms that disagree on run.runs_dir are an error."""
    from pipeline.recipe import load_recipe

    runs, dirs = [], set()
    for path in recipes:
        recipe = load_recipe(path, overrides or [])
        dirs.add(Path(recipe.run.runs_dir))
        seeds = list(recipe.study.seeds) or [None]
        for seed in seeds:
            name = recipe.run.name if seed is None else f"{recipe.run.name}-s{seed}"
            extra = [] if seed is None else [f"run.seed={seed}", f"run.name={name}"]
            runs.append((path, StudyRun(name, path.stem, seed), extra))
    if len(dirs) != 1:
        raise ConfigError(f"run.runs_dir: the arms of a study must share one runs directory, got "
                          f"{', '.join(sorted(map(str, dirs)))}; set it in the shared base recipe")
    # seed-major: every arm's first seed before any arm's second (stable within a seed), so a study cut short
    # has each arm at the same number of seeds
    runs.sort(key=lambda item: -1 if item[1].seed is None else item[1].seed)
    names = [r.run for _, r, _ in runs]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"run.name: two arms of the study would write the same run directory {', '.join(dup)}; "
                          "give each arm its own run.name")
    return dirs.pop(), runs


def _cache_of(path: Path, extra: list[str], overrides: list[str]) -> str | None:
    """The shared teacher cache folder (teacher_cache.dir, resolved) that a run reads, or None."""
    from pipeline.recipe import load_recipe

    recipe = load_recipe(path, [*overrides, *extra])
    if recipe.teacher_cache.enabled and recipe.teacher_cache.dir:
        return str(Path(recipe.teacher_cache.dir).resolve())
    return None


def _schedule(tasks: list[tuple[str, set[str], Callable[[], None]]], jobs: int) -> None:
    """Runs (name, needs, work) tasks on `jobs` threads: each worker takes the first pending task whose `needs`
    (names of other tasks) have all finished, so a task that waits never holds a slot that another could use.
    After a failure no new task starts; the first error is raised once the running ones end."""
    pending, done, errors = list(tasks), set(), []
    cond = threading.Condition()

    def worker() -> None:
        while True:
            with cond:
                while True:
                    if errors or not pending:
                        return
                    ready = next((t for t in pending if t[1] <= done), None)
                    if ready is not None:
                        pending.remove(ready)
                        break
                    cond.wait()
            try:
                ready[2]()
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the other workers stop
                with cond:
                    errors.append(exc)
                    cond.notify_all()
                return
            with cond:
                done.add(ready[0])
                cond.notify_all()

    threads = [threading.Thread(target=worker, daemon=True) for _ in range(max(1, jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


def _run_one(path: Path, run: StudyRun, extra: list[str], overrides: list[str], env: dict, log: Path | None,
             stages: str | None = None) -> float:
    """One `python -m pipeline run`; its output to the console (log None) or to `log`. Returns seconds."""
    cmd = [sys.executable, "-m", "pipeline", "run", str(path), *overrides, *extra]
    if stages:
        cmd += ["--stages", stages]
    t0 = time.perf_counter()
    if log is None:
        code = subprocess.run(cmd, check=False, env=env).returncode
    else:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a", encoding="utf-8") as fh:
            code = subprocess.run(cmd, check=False, env=env, stdout=fh, stderr=subprocess.STDOUT).returncode
    if code != 0:
        where = "above" if log is None else f"in {log}"
        raise PipelineError(f"{path} (run {run.run}): the run failed (exit {code}, its error is {where}); fix it "
                            "and rerun the study, which skips the runs and stages already done")
    return time.perf_counter() - t0


def _thread_env(jobs: int) -> dict:
    """The environment of each run: with several jobs, the cores are split between them."""
    env = os.environ.copy()
    if jobs > 1:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        env["OMP_NUM_THREADS"] = str(max(1, cores // jobs))
    return env


def run_study(folder: str | Path, out_dir: str | Path | None = None, only: list[str] | None = None,
              report_only: bool = False, overrides: list[str] | None = None, jobs: int = 1) -> dict:
    """Run every arm and seed (see the module docstring), then build the report; returns its rows and files."""
    from eval.leaderboard import build_leaderboard
    from eval.study_report import write_study_report

    overrides = list(overrides or [])
    runs_dir, runs = study_runs(study_recipes(folder, only), overrides)
    if not report_only:
        env = _thread_env(jobs)
        total = len(runs)
        if jobs == 1:
            for i, (path, run, extra) in enumerate(runs, 1):
                print(f"\n=== study run {i}/{total}: {run.run} ({path}) ===", flush=True)
                print(f"=== {run.run}: {_run_one(path, run, extra, overrides, env, None):.0f} s ===", flush=True)
        else:
            def work(path, run, extra, stages=None):
                def go():
                    what = "building its shared teacher cache" if stages else "started"
                    print(f"=== {run.run}: {what} ({runs_dir / run.run / 'study.log'}) ===", flush=True)
                    seconds = _run_one(path, run, extra, overrides, env, runs_dir / run.run / "study.log", stages)
                    print(f"=== {run.run}: {'cache built' if stages else 'done'} in {seconds:.0f} s ===", flush=True)
                return go

            # each shared teacher cache is built once, by the first run that reads it, first in the queue; a run
            # that reads it waits for it while runs without a teacher cache take the other slots
            caches = [_cache_of(path, extra, overrides) for path, _, extra in runs]
            first = {}
            for item, cache in zip(runs, caches):
                if cache is not None:
                    first.setdefault(cache, item)
            tasks = [(f"cache:{cache}", set(), work(*item, stages="prepare,teacher_cache"))
                     for cache, item in first.items()]
            tasks += [(run.run, {f"cache:{cache}"} if cache else set(), work(path, run, extra))
                      for (path, run, extra), cache in zip(runs, caches)]
            _schedule(tasks, jobs)
    out = Path(out_dir or runs_dir / "leaderboard")
    board = build_leaderboard(runs_dir, out, only={run.run for _, run, _ in runs})
    board["files"].update(write_study_report(board["rows"], [run for _, run, _ in runs], runs_dir, out))
    return board
