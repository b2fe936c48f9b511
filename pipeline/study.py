"""A study: every recipe of a folder run (per seed, at a learning rate swept per arm), then one report.

`spikedistill study recipes/study --out docs/results` runs each `recipes/study/*.yaml` (files starting with
"_" are shared bases, not arms) in its own `spikedistill run` process. An arm whose recipe sets
`study.seeds: [0, 1, 2]` runs once per seed, as run.name=<name>-s<seed> with run.seed=<seed>. An arm whose
recipe also sets `study.lr_grid` first sweeps the learning rate on its first seed (pipeline/sweep.py: one run
per rate through distill, named <name>-lr<rate>-s<seed>, e.g. b_snn_ce-lr2e-3-s0, chosen by validation
bits/byte), then finishes the chosen run (export, evaluate) and runs its other seeds at the chosen rate: the
arm's runs are <name>-lr<chosen>-s<seed> for every seed, the first of them being the sweep's own run.
Runs go in this order: every arm's sweep points (and single-run arms), then every arm's first seed, then every
arm's second seed, ...; an arm's seeds start once its sweep has chosen. Then it writes the sweep's table
(sweep.json, sweep.md), the leaderboard of the arms' runs (table, JSON, plots) and the study report
(eval.study_report: summary.json with one record per run, study.md with mean +- std per arm and the goals
answered, learning curves and token efficiency with error bands) into --out.

Every run is an ordinary resumable run: rerunning the command skips finished runs (their last stage's
done.json matches the recipe) and sweep points (their distill's), and resumes an interrupted run from its last
checkpoint, so an interrupted study continues where it stopped and nothing runs twice. With --archive DIR the
finished runs' records (no weights; pipeline/study_archive.py) are kept in DIR, e.g. in git, and restored first,
so the study goes on from a fresh clone or another machine. With --jobs N, N runs
go at once, each with cores/N threads (with one job: all cores, a fixed count, so that a rerun gives the same
numbers; the thread count changes the floating-point sums); each shared teacher cache is built once, first in
the queue, and the runs that read it wait for it while runs without one take the other slots, so no two runs
build the same cache and no core idles while it is built. With --cache-all-cores a build instead takes every
slot and every core: no run trains beside it, but it ends sooner, which is what counts when a session must
finish a cache and the runs that read it (its shards are lost with the machine). A shared cache's feature targets
(teacher_cache.features) are built once too, by the first run of an arm that asks for them, after its logits.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from eval.study_report import StudyRun
from pipeline.errors import ConfigError, PipelineError
from pipeline.recipe import load_recipe
from pipeline.runner import plan_stages, read_done, stage_config_hash
from pipeline.schema import lr_label
from pipeline.stages.teacher_cache import FEATURES_DIR
from pipeline.study_archive import archive_run, is_restored, restore_runs
from pipeline.sweep import Sweep, lr_sweep, sweep_record, write_sweep_report


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


@dataclass(frozen=True)
class Arm:
    """One arm of a study as its recipe (with the study's overrides) sets it.

    seeds: study.seeds, or (None,) for one run as the recipe is; grid: study.lr_grid (empty: no sweep);
    lr_ratios: (optimiser section, its min_lr / lr) per study.lr_keys; caches: what it reads of a shared
    teacher cache, each built once: () or (its folder, resolved) and, with teacher_cache.features, also
    "<folder>/features"; sweep_stages: the stages a sweep point runs (the enabled ones up to distill);
    last_stage: the last stage of a full run."""

    path: Path
    name: str
    seeds: tuple[int | None, ...]
    grid: tuple[float, ...]
    extensions: int
    lr_ratios: tuple[tuple[str, float], ...]
    caches: tuple[str, ...]
    sweep_stages: str
    last_stage: str


@dataclass(frozen=True)
class PlannedRun:
    """One run of an arm: its recipe, its StudyRun (run directory name, arm, seed), its learning rate (None:
    the recipe's) and the overrides that make it (run.seed, run.name, the swept rates)."""

    path: Path
    run: StudyRun
    lr: float | None
    extra: tuple[str, ...]


def _arm(path: Path, recipe) -> Arm:
    stages = plan_stages(recipe, None)
    optim = {"distill.train.optim": recipe.distill.train.optim, "align.train.optim": recipe.align.train.optim}
    sections = [key.removesuffix(".lr") for key in recipe.study.lr_keys]
    cache = recipe.teacher_cache
    caches: tuple[str, ...] = ()
    if cache.enabled and cache.dir:
        folder = str(Path(cache.dir).resolve())
        caches = (folder, f"{folder}/{FEATURES_DIR}") if cache.features else (folder,)
    return Arm(path=path, name=recipe.run.name, seeds=tuple(recipe.study.seeds) or (None,),
               grid=tuple(recipe.study.lr_grid), extensions=recipe.study.lr_extensions,
               lr_ratios=tuple((s, optim[s].min_lr / optim[s].lr) for s in sections), caches=caches,
               sweep_stages=",".join(stages[:stages.index("distill") + 1]), last_stage=stages[-1])


def study_arms(recipes: list[Path], overrides: list[str] | None = None) -> tuple[Path, list[Arm]]:
    """(the one runs directory, the arms), validating every recipe up front.

    Arms that disagree on run.runs_dir, or share a run.name, are an error."""
    arms, dirs = [], set()
    for path in recipes:
        recipe = load_recipe(path, overrides or [])
        dirs.add(Path(recipe.run.runs_dir))
        arms.append(_arm(path, recipe))
    if len(dirs) != 1:
        raise ConfigError(f"run.runs_dir: the arms of a study must share one runs directory, got "
                          f"{', '.join(sorted(map(str, dirs)))}; set it in the shared base recipe")
    names = [a.name for a in arms]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ConfigError(f"run.name: two arms of the study would write the same run directories {', '.join(dup)}; "
                          "give each arm its own run.name")
    return dirs.pop(), arms


def arm_run(arm: Arm, seed: int | None, lr: float | None) -> PlannedRun:
    """The run of `arm` at `seed` (None: the recipe's) and learning rate `lr` (None: the recipe's): named
    <name>[-lr<rate>][-s<seed>], with min_lr at the recipe's ratio for every swept optimiser."""
    name = arm.name + ("" if lr is None else f"-lr{lr_label(lr)}") + ("" if seed is None else f"-s{seed}")
    extra = [] if seed is None and lr is None else [f"run.name={name}"]
    if seed is not None:
        extra.append(f"run.seed={seed}")
    if lr is not None:
        for section, ratio in arm.lr_ratios:
            extra += [f"{section}.lr={lr!r}", f"{section}.min_lr={lr * ratio!r}"]
    return PlannedRun(arm.path, StudyRun(name, arm.path.stem, seed), lr, tuple(extra))


class StudyPlan:
    """The runs of a study as they become known: each arm's sweep points until its sweep chooses, then its
    runs at the chosen rate (every run at once for an arm without a sweep). Sweep results are read from the
    runs' distill done.json, so a rerun finds the points that finished before."""

    def __init__(self, runs_dir: Path, arms: list[Arm], overrides: list[str], archive: Path | None = None):
        self.runs_dir, self.arms, self.overrides, self.archive = runs_dir, arms, overrides, archive
        self.lock = threading.Lock()
        self.queued: set[tuple[str, str | None]] = set()
        self._recipes: dict[str, object] = {}

    def finished(self, planned: PlannedRun, stage: str) -> dict | None:
        """The run's done.json of `stage` when it is finished with this recipe (same config hash), else None."""
        done = read_done(self.runs_dir / planned.run.run / stage)
        if done is None:
            return None
        return done if done["config_hash"] == stage_config_hash(self._recipe(planned), stage) else None

    def _recipe(self, planned: PlannedRun):
        name = planned.run.run
        if name not in self._recipes:  # a recipe loads in ~50 ms; the plan asks about each run many times
            self._recipes[name] = load_recipe(planned.path, [*self.overrides, *planned.extra])
        return self._recipes[name]

    def diverged(self, planned: PlannedRun) -> bool:
        """The run's distill, started with this recipe, stopped on non-finite losses: the last row of its
        metrics.jsonl says "diverged" (pipeline.trainer)."""
        stage_dir = self.runs_dir / planned.run.run / "distill"
        try:
            started = json.loads((stage_dir / "stage.json").read_text())
            last = json.loads((stage_dir / "metrics.jsonl").read_text().splitlines()[-1])
        except (OSError, ValueError, IndexError):
            return False
        same = started.get("config_hash") == stage_config_hash(self._recipe(planned), "distill")
        return same and "diverged" in last

    def results(self, arm: Arm, lrs) -> dict[float, float]:
        """{rate: final validation bits/byte} of the arm's finished sweep points among `lrs` (inf for a point
        that diverged)."""
        out = {}
        for lr in lrs:
            done = self.finished(arm_run(arm, arm.seeds[0], lr), "distill")
            if done is None and self.diverged(arm_run(arm, arm.seeds[0], lr)):
                out[lr] = math.inf
            elif done is not None:
                value = done.get("metrics", {}).get("val_bits_per_byte")
                if value is None:
                    raise PipelineError(f"{self.runs_dir / arm_run(arm, arm.seeds[0], lr).run.run}/distill/done.json"
                                        ": no val_bits_per_byte to choose the learning rate by; the sweep needs a "
                                        "validation split (data.val_fraction > 0)")
                out[lr] = float(value)
        return out

    def sweep(self, arm: Arm) -> tuple[Sweep, dict[float, float]]:
        """The arm's sweep state and the results it rests on (grow the points until the state is stable)."""
        results: dict[float, float] = {}
        while True:
            state = lr_sweep(list(arm.grid), results, arm.extensions)
            fresh = self.results(arm, [lr for lr in state.points if lr not in results])
            if not fresh:
                return state, results
            results.update(fresh)

    def final_runs(self, arm: Arm) -> list[PlannedRun] | None:
        """The arm's runs that the report reads (each seed at the chosen rate); None while its sweep is open."""
        if not arm.grid:
            return [arm_run(arm, seed, None) for seed in arm.seeds]
        state, _ = self.sweep(arm)
        if state.chosen is None:
            return None
        return [arm_run(arm, seed, state.chosen) for seed in arm.seeds]

    def next_runs(self, arm: Arm) -> list[tuple[PlannedRun, str | None, int]]:
        """(run, --stages or None for a full run, priority) for the arm's runs to start now that are not
        queued yet: its pending sweep points (through distill), or its final runs once the sweep has chosen.
        Priority: 0 for sweep points and an arm's first seed, i for its (i+1)-th seed."""
        with self.lock:
            final = self.final_runs(arm)
            if final is None:
                state, _ = self.sweep(arm)
                todo = [(arm_run(arm, arm.seeds[0], lr), arm.sweep_stages, 0) for lr in state.pending]
            else:
                todo = [(run, None, i) for i, run in enumerate(final)
                        if self.finished(run, arm.last_stage) is None]
            # a sweep point (through distill) and the same run in full (the chosen rate's first seed) are two
            todo = [t for t in todo if (t[0].run.run, t[1]) not in self.queued]
            self.queued.update((t[0].run.run, t[1]) for t in todo)
            for run, stages, _ in todo:
                # records restored from an archive, without weights: a run that must go further starts over
                # (the chosen sweep point's full run retrains its distill; its other points are all done)
                if is_restored(self.runs_dir / run.run.run):
                    shutil.rmtree(self.runs_dir / run.run.run)
            return todo

    def finished_runs(self) -> list[PlannedRun]:
        """The runs whose records the study reads: each arm's sweep points with a result (distill done, or
        diverged) and its runs at the chosen rate that finished their last stage; each run once."""
        out: dict[str, PlannedRun] = {}
        for arm in self.arms:
            if arm.grid:
                _, results = self.sweep(arm)
                out.update((r.run.run, r) for r in (arm_run(arm, arm.seeds[0], lr) for lr in results))
            out.update((r.run.run, r) for r in self.final_runs(arm) or []
                       if self.finished(r, arm.last_stage) is not None)
        return list(out.values())

    def archive_all(self) -> list[str]:
        """Copy every finished run's records into the archive (pipeline.study_archive); returns their names."""
        if self.archive is None:
            return []
        runs = self.finished_runs()
        for run in runs:
            archive_run(self.runs_dir / run.run.run, self.archive)
        return [r.run.run for r in runs]

    def records(self) -> list[dict]:
        """sweep.json's rows: one per arm with a sweep (pipeline.sweep.sweep_record)."""
        rows = []
        for arm in self.arms:
            if not arm.grid:
                continue
            state, results = self.sweep(arm)
            seed = arm.seeds[0]
            finals = self.final_runs(arm) or []
            rows.append(sweep_record(arm.path.stem, seed, list(arm.grid), state, results,
                                     {lr: arm_run(arm, seed, lr).run.run for lr in state.points},
                                     [(r.run.run, r.run.seed) for r in finals]))
        return rows


class Task(NamedTuple):
    """A unit of scheduled work: `work()` may return new tasks, queued when it ends. Lower priority first.
    slots: how many of the `jobs` slots it occupies while it runs (1, or more for a build on more cores)."""

    name: str
    needs: set[str]
    work: Callable[[], list | None]
    priority: float = 0
    slots: int = 1


def _schedule(tasks: list, jobs: int) -> None:
    """Runs Task(name, needs, work[, priority[, slots]]) items on `jobs` slots: each free worker takes the
    pending task of lowest priority (then first queued) whose `needs` (names of other tasks) have all
    finished, so a task that waits never holds a slot that another could use. A task of several slots starts
    when that many are free; until then no task behind it starts (the slots it waits for are kept for it).
    The tasks a finished work() returns join the queue. After a failure no new task starts; the first error
    is raised once the running ones end."""
    def task(t) -> Task:  # a task of more slots than there are takes them all
        t = Task(*t)
        return t._replace(slots=min(t.slots, jobs))

    pending, done, errors, running, busy = [task(t) for t in tasks], set(), [], [0], [0]
    cond = threading.Condition()

    def take() -> Task | None:
        with cond:
            while True:
                if errors or (not pending and not running[0]):
                    return None
                ready = [t for t in pending if t.needs <= done]
                if ready:
                    first = min(ready, key=lambda t: t.priority)  # min keeps the first of equals
                    if busy[0] + first.slots <= jobs:
                        pending.remove(first)
                        running[0] += 1
                        busy[0] += first.slots
                        return first
                if not running[0] and not ready:  # nothing runs that could satisfy them: a bug, not a wait
                    errors.append(PipelineError(f"study: {', '.join(t.name for t in pending)} wait for tasks "
                                                "that never ran"))
                    cond.notify_all()
                    return None
                cond.wait()

    def worker() -> None:
        while (current := take()) is not None:
            try:
                new = current.work() or []
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the other workers stop
                with cond:
                    errors.append(exc)
                    running[0] -= 1
                    busy[0] -= current.slots
                    cond.notify_all()
                return
            with cond:
                pending.extend(task(t) for t in new)
                done.add(current.name)
                running[0] -= 1
                busy[0] -= current.slots
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


def _thread_env(jobs: int, slots: int = 1) -> dict:
    """The environment of a run that occupies `slots` of `jobs`: with several jobs, the cores are split
    between them, `slots` shares of cores/jobs each; with one, it gets every core (or OMP_NUM_THREADS when
    set). Either way a fixed count: the thread governor would change it with the machine's load, and so the
    floating-point sums of a rerun."""
    from students.ops.threads import available_cores

    env = os.environ.copy()
    if jobs > 1:
        env["OMP_NUM_THREADS"] = str(max(1, available_cores() // jobs) * min(slots, jobs))
    else:
        env.setdefault("OMP_NUM_THREADS", str(available_cores()))
    return env


RunFn = Callable[[PlannedRun, "str | None", "Path | None", int], None]


def execute_study(plan: StudyPlan, jobs: int, run_fn: RunFn, cache_slots: int = 1) -> None:
    """Run every arm's sweep and runs (see the module docstring) through `run_fn(run, stages, log, slots)`:
    stages "a,b,..." or None (a full run), log the file for its output or None (the console, with one job),
    slots how many of the `jobs` slots the run occupies (its share of the cores). cache_slots: the slots of
    each shared teacher-cache build (`jobs`: every core, while no run trains beside it)."""

    def go(arm: Arm, planned: PlannedRun, stages: str | None, what: str, slots: int = 1) -> Callable[[], list]:
        """The work of one run; after a sweep point, the arm's next runs (more points or its seeds)."""
        def work() -> list:
            log = None if jobs == 1 else plan.runs_dir / planned.run.run / "study.log"
            print(f"=== {planned.run.run}: {what} started{'' if log is None else f' ({log})'} ===", flush=True)
            t0, ended = time.perf_counter(), "done"
            try:
                run_fn(planned, stages, log, slots)
            except PipelineError:
                if stages != arm.sweep_stages or not plan.diverged(planned):
                    raise
                ended = "diverged (non-finite losses: the sweep's worst point)"
            print(f"=== {planned.run.run}: {what} {ended} in {time.perf_counter() - t0:.0f} s ===", flush=True)
            if plan.archive is not None and what != "teacher cache build":
                archive_run(plan.runs_dir / planned.run.run, plan.archive)
            return [] if stages != arm.sweep_stages else tasks_of(arm, plan.next_runs(arm))
        return work

    def tasks_of(arm: Arm, todo) -> list[Task]:
        needs = {f"cache:{c}" for c in arm.caches}
        return [Task(f"{run.run.run}:{stages or 'all'}", needs,
                     go(arm, run, stages, "lr sweep point" if stages else "run"), priority)
                for run, stages, priority in todo]

    tasks, caches = [], set()
    for arm in plan.arms:
        todo = plan.next_runs(arm)
        for i, cache in enumerate(arm.caches if todo else ()):
            if cache in caches:
                continue
            # each shared teacher cache (and its feature targets) is built once, by the first run that reads
            # it, first in the queue, features after logits; the runs that read it wait for it while runs
            # without a teacher cache take the other slots
            caches.add(cache)
            builder = todo[0][0]
            built = plan.finished(builder, "teacher_cache") is not None
            tasks.append(Task(f"cache:{cache}", {f"cache:{c}" for c in arm.caches[:i]}, list if built else
                              go(arm, builder, "prepare,teacher_cache", "teacher cache build", cache_slots), -1,
                              1 if built else cache_slots))
        tasks += tasks_of(arm, todo)
    _schedule(tasks, jobs)


def run_study(folder: str | Path, out_dir: str | Path | None = None, only: list[str] | None = None,
              report_only: bool = False, overrides: list[str] | None = None, jobs: int = 1,
              run_fn: RunFn | None = None, archive: str | Path | None = None,
              cache_all_cores: bool = False) -> dict:
    """Run every arm's sweep and seeds (see the module docstring), then build the report; returns its rows
    and files. `archive`: a folder of finished runs' records (pipeline.study_archive), restored into the runs
    directory first and updated as runs finish. cache_all_cores: each shared teacher-cache build runs on every
    core, alone (see execute_study). `run_fn` replaces the `spikedistill run` subprocess (tests)."""
    from eval.leaderboard import build_leaderboard
    from eval.study_report import write_study_report

    overrides = list(overrides or [])
    runs_dir, arms = study_arms(study_recipes(folder, only), overrides)
    plan = StudyPlan(runs_dir, arms, overrides, None if archive is None else Path(archive))
    if archive is not None:
        restored = restore_runs(archive, runs_dir)
        if restored:
            print(f"=== restored {len(restored)} finished run(s) from {archive} (records only, no weights) ===")
    if not report_only:
        def subprocess_run(planned: PlannedRun, stages: str | None, log: Path | None, slots: int) -> None:
            _run_one(planned.path, planned.run, list(planned.extra), overrides, _thread_env(jobs, slots), log,
                     stages)

        execute_study(plan, jobs, run_fn or subprocess_run, cache_slots=jobs if cache_all_cores else 1)
    out = Path(out_dir or runs_dir / "leaderboard")
    runs = []
    for arm in arms:
        final = plan.final_runs(arm)
        if final is None:
            print(f"=== {arm.path.stem}: its learning-rate sweep has not finished; left out of the report ===")
        runs += [r.run for r in final or []]
    if archive is not None:
        print(f"=== {len(plan.archive_all())} finished run(s) archived in {archive} ===")
    sweep_files = write_sweep_report(plan.records(), out) if any(a.grid for a in arms) else {}
    board = build_leaderboard(runs_dir, out, only={run.run for run in runs})
    board["files"].update(sweep_files)
    board["files"].update(write_study_report(board["rows"], runs, runs_dir, out))
    return board
