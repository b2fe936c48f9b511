"""The study's learning-rate sweep (pipeline/sweep.py, pipeline/study.py): the choice (validation bits/byte,
ties to the lower rate, factor-2 extension of an edge winner up to a cap), its table, the scheduling of a
dynamic task set (sweep points, then seeds; shared teacher cache first) and resumption, all with stub runs
that write the done.json files a real run would; then one tiny real `spikedistill study` with a 3-point grid."""

from __future__ import annotations

import json
import math
import threading
import time
from pathlib import Path

import pytest

from pipeline.errors import ConfigError, PipelineError
from pipeline.recipe import load_recipe
from pipeline.schema import lr_label
from pipeline.sweep import lr_sweep


def test_sweep_keeps_an_inner_winner_and_breaks_ties_toward_the_lower_rate():
    grid = [4e-3, 1e-3, 2e-3]  # any order
    assert lr_sweep(grid, {}, 2).pending == (1e-3, 2e-3, 4e-3)
    assert lr_sweep(grid, {1e-3: 2.1}, 2).pending == (2e-3, 4e-3)
    s = lr_sweep(grid, {1e-3: 2.1, 2e-3: 2.0, 4e-3: 2.05}, 2)
    assert (s.points, s.pending, s.chosen, s.at_edge) == ((1e-3, 2e-3, 4e-3), (), 2e-3, False)
    tie = lr_sweep(grid, {1e-3: 2.1, 2e-3: 2.0, 4e-3: 2.0}, 2)
    assert tie.chosen == 2e-3 and not tie.at_edge  # 2e-3 and 4e-3 tie: the lower rate
    # a tie at the low edge makes the edge point the winner, so the sweep extends below it
    assert lr_sweep(grid, {1e-3: 2.0, 2e-3: 2.0, 4e-3: 2.1}, 2).pending == (5e-4,)
    # a point whose validation bits/byte is not finite loses to every finite one
    nan = lr_sweep(grid, {1e-3: 2.1, 2e-3: 2.05, 4e-3: math.nan}, 2)
    assert nan.chosen == 2e-3 and not nan.at_edge


def test_sweep_extends_an_edge_winner_by_factors_of_two_up_to_the_cap():
    grid = [1e-3, 2e-3, 4e-3]
    rising = {1e-3: 2.3, 2e-3: 2.2, 4e-3: 2.1}  # the best rate is the highest
    s = lr_sweep(grid, rising, 2)
    assert (s.points, s.pending, s.chosen) == ((1e-3, 2e-3, 4e-3, 8e-3), (8e-3,), None)
    s = lr_sweep(grid, {**rising, 8e-3: 2.15}, 2)  # 8e-3 is worse: 4e-3 is now inside the points tried
    assert (s.points, s.pending, s.chosen, s.at_edge) == ((1e-3, 2e-3, 4e-3, 8e-3), (), 4e-3, False)
    s = lr_sweep(grid, {**rising, 8e-3: 2.0}, 2)
    assert s.pending == (1.6e-2,)
    s = lr_sweep(grid, {**rising, 8e-3: 2.0, 1.6e-2: 1.9}, 2)  # still rising at the cap: chosen at the edge
    assert (s.points, s.pending, s.chosen, s.at_edge) == ((1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2), (), 1.6e-2, True)
    falling = {1e-3: 2.0, 2e-3: 2.1, 4e-3: 2.2, 5e-4: 1.9, 2.5e-4: 1.8}
    s = lr_sweep(grid, falling, 2)
    assert (s.points, s.chosen, s.at_edge) == ((2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3), 2.5e-4, True)
    s = lr_sweep(grid, falling, 1)
    assert (s.points, s.chosen, s.at_edge) == ((5e-4, 1e-3, 2e-3, 4e-3), 5e-4, True)
    s = lr_sweep(grid, rising, 0)  # no extensions allowed: the edge winner is chosen and flagged
    assert (s.points, s.chosen, s.at_edge) == ((1e-3, 2e-3, 4e-3), 4e-3, True)


@pytest.mark.parametrize("override, message", [
    ("study.lr_grid=[1e-3,2e-3]", r"study\.lr_grid: must be an empty list \(no sweep\) or >= 3"),
    ("study.lr_grid=[1e-3,2e-3,0.0]", r"study\.lr_grid: must be"),
    ("study.lr_grid=[1e-3,1.0001e-3,2e-3]", r"differ in their first 3 digits"),
    ("study.lr_keys=[distill.train.optim.min_lr]", r"study\.lr_keys: must be a non-empty list of distinct keys"),
    ("study.lr_keys=[]", r"study\.lr_keys"),
    ("study.lr_extensions=-1", r"study\.lr_extensions: must be >= 0"),
])
def test_sweep_keys_are_checked(override, message):
    with pytest.raises(ConfigError, match=message) as err:
        load_recipe(None, [override])
    assert "\n" not in str(err.value)


def test_sweep_needs_a_validation_split():
    with pytest.raises(ConfigError, match=r"study\.lr_grid: must be empty when data\.val_fraction is 0"):
        load_recipe(None, ["study.lr_grid=[1e-3,2e-3,4e-3]", "data.val_fraction=0"])


# ---------------------------------------------------------------- the study with stub runs

STUB_BASE = """\
run: {{seed: 0, runs_dir: {runs}}}
study: {{seeds: [0, 1], lr_grid: [1.0e-3, 2.0e-3, 4.0e-3], lr_extensions: 2}}
data: {{sources: [corpus.txt], seq_len: 16, val_fraction: 0.1, split_seed: 0}}
teacher: {{spec: tiny-teacher}}
student: {{preset: tiny}}
teacher_cache: {{enabled: false, dir: {cache}}}
align: {{enabled: false}}
distill:
  train: {{steps: 4, batch_size: 2, optim: {{lr: 2.0e-3, min_lr: 1.0e-4}}}}
  weights: {{sta: 0.0, hta: 1.0}}
"""

# validation bits/byte of each stub arm as a function of the rate; the stub's held-out score (evaluate's
# bpb_persuasion, 10 - this) ranks the rates the other way round: a sweep that chose by it would pick another
CURVES = {
    "hi": lambda lr: 2.0 + math.log2(lr / 8e-3) ** 2,    # best at 8e-3: two steps above the grid's top
    "kd": lambda lr: 2.0 + math.log2(lr / 2e-3) ** 2,    # best at 2e-3, inside the grid
    "lo": lambda lr: 2.0 + 1000 * lr,                     # falling without end toward low rates: the cap
}


def _stub_study(tmp_path) -> Path:
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "_base.yaml").write_text(STUB_BASE.format(runs=tmp_path / "runs", cache=tmp_path / "cache"))
    (folder / "hi.yaml").write_text("base: _base.yaml\nrun: {name: hi}\n")
    (folder / "kd.yaml").write_text("base: _base.yaml\nrun: {name: kd}\nteacher_cache: {enabled: true}\n"
                                    "distill: {weights: {sta: 0.5, hta: 0.5}}\n")
    (folder / "lo.yaml").write_text("base: _base.yaml\nrun: {name: lo}\n")
    return folder


class StubRuns:
    """Stands in for `spikedistill run`: writes each requested stage's done.json as a real run would (the
    recipe's config hash; distill's val_bits_per_byte and evaluate's held-out bits/byte from the curves above)
    and records every call as (run, stages, start, end)."""

    def __init__(self, runs_dir: Path, fail: set[str] | frozenset = frozenset(), hold=None,
                 diverge: set[str] | frozenset = frozenset()):
        self.runs_dir, self.fail, self.hold, self.diverge = runs_dir, set(fail), hold, set(diverge)
        self.calls: list[tuple[str, str | None, float, float]] = []
        self.slots: dict[tuple[str, str | None], int] = {}
        self.recipes: dict = {}
        self.lock = threading.Lock()

    def __call__(self, planned, stages, log, slots=1):
        self.slots[(planned.run.run, stages)] = slots
        from pipeline.runner import plan_stages, stage_config_hash

        start = time.monotonic()
        if self.hold is not None:
            self.hold(planned.run.run, stages)
        if planned.run.run in self.fail:
            self.fail.discard(planned.run.run)
            raise RuntimeError(f"{planned.run.run}: stub failure")
        if (self.runs_dir / planned.run.run / "restored.json").is_file():
            # a real run would skip the restored distill (done, same config) and find no weights to export
            raise PipelineError(f"{planned.run.run}: distill/student/model.safetensors not found (exit 2)")
        if planned.run.run not in self.recipes:
            self.recipes[planned.run.run] = load_recipe(planned.path, list(planned.extra))
        recipe = self.recipes[planned.run.run]
        arm, lr = planned.run.arm, recipe.distill.train.optim.lr
        if planned.run.run in self.diverge:  # what the runner and the trainer leave behind
            folder = self.runs_dir / planned.run.run / "distill"
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "stage.json").write_text(json.dumps({"config_hash": stage_config_hash(recipe, "distill")}))
            (folder / "metrics.jsonl").write_text('{"step": 3, "split": "train", "diverged": 5.0}\n')
            with self.lock:
                self.calls.append((planned.run.run, stages, start, time.monotonic()))
            raise PipelineError(f"{planned.run.run}: the run failed (exit 2)")
        for stage in stages.split(",") if stages else plan_stages(recipe, None):
            metrics = {"distill": {"val_bits_per_byte": CURVES[arm](lr)},
                       "evaluate": {"bpb_persuasion": 10.0 - CURVES[arm](lr)}}.get(stage, {})
            folder = self.runs_dir / planned.run.run / stage
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "done.json").write_text(json.dumps({"stage": stage, "metrics": metrics,
                                                          "config_hash": stage_config_hash(recipe, stage)}))
        with self.lock:
            self.calls.append((planned.run.run, stages, start, time.monotonic()))

    def names(self) -> list[tuple[str, str | None]]:
        return [(run, stages) for run, stages, *_ in self.calls]


def _plan(folder: Path, runs_dir: Path, archive: Path | None = None):
    from pipeline.study import StudyPlan, study_arms, study_recipes

    found, arms = study_arms(study_recipes(folder))
    assert found == runs_dir
    return StudyPlan(runs_dir, arms, [], archive)


CE, KD = "prepare,distill", "prepare,teacher_cache,distill"
EXPECTED = {  # worked out by hand from CURVES, the grid and the cap of 2
    ("kd-lr1e-3-s0", "prepare,teacher_cache"),  # the shared cache, built by the first run that reads it
    *((f"hi-lr{x}-s0", CE) for x in ("1e-3", "2e-3", "4e-3", "8e-3", "1.6e-2")),
    ("hi-lr8e-3-s0", None), ("hi-lr8e-3-s1", None),
    *((f"kd-lr{x}-s0", KD) for x in ("1e-3", "2e-3", "4e-3")),
    ("kd-lr2e-3-s0", None), ("kd-lr2e-3-s1", None),
    *((f"lo-lr{x}-s0", CE) for x in ("1e-3", "2e-3", "4e-3", "5e-4", "2.5e-4")),
    ("lo-lr2.5e-4-s0", None), ("lo-lr2.5e-4-s1", None),
}


def _check_order(calls) -> None:
    """Each arm's seeds start after every one of its sweep points ended; cache readers after the build."""
    ends = {}
    for run, stages, start, end in calls:
        ends.setdefault((run.split("-")[0], stages is None), []).append((start, end))
    for arm in ("hi", "kd", "lo"):
        assert max(e for _, e in ends[(arm, False)]) <= min(s for s, _ in ends[(arm, True)])
    build_end = next(end for run, stages, _, end in calls if stages == "prepare,teacher_cache")
    assert all(start >= build_end for run, stages, start, _ in calls
               if run.startswith("kd-") and stages != "prepare,teacher_cache")


def _check_table(plan, out: Path) -> None:
    """sweep.json and sweep.md of the finished stub study: every point, the choice and the edge flag."""
    from pipeline.sweep import write_sweep_report

    files = write_sweep_report(plan.records(), out)
    table = json.loads(Path(files["sweep"]).read_text())
    arms = {a["arm"]: a for a in table["arms"]}
    assert (arms["hi"]["chosen_lr"], arms["hi"]["at_edge"], arms["hi"]["extensions"]) == (8e-3, False, 2)
    assert (arms["kd"]["chosen_lr"], arms["kd"]["at_edge"], arms["kd"]["extensions"]) == (2e-3, False, 0)
    assert (arms["lo"]["chosen_lr"], arms["lo"]["at_edge"], arms["lo"]["extensions"]) == (2.5e-4, True, 2)
    assert [p["lr"] for p in arms["hi"]["points"]] == [1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2]
    assert arms["kd"]["points"][0] == {"lr": 1e-3, "run": "kd-lr1e-3-s0", "val_bpb": 3.0,  # 2 + log2(1/2)^2
                                       "diverged": False}
    assert {(r["run"], r["arm"], r["seed"], r["lr"]) for r in table["runs"]} == {
        ("hi-lr8e-3-s0", "hi", 0, 8e-3), ("hi-lr8e-3-s1", "hi", 1, 8e-3), ("kd-lr2e-3-s0", "kd", 0, 2e-3),
        ("kd-lr2e-3-s1", "kd", 1, 2e-3), ("lo-lr2.5e-4-s0", "lo", 0, 2.5e-4), ("lo-lr2.5e-4-s1", "lo", 1, 2.5e-4)}
    md = Path(files["sweep_table"]).read_text()
    assert "| kd | 0 | 1e-3: 3.0000, **2e-3: 2.0000**, 4e-3: 3.0000 | 2e-3 | no |" in md
    assert "| lo | 0 | **2.5e-4: 2.2500**, 5e-4: 2.5000, 1e-3: 3.0000," in md
    assert "| 2.5e-4 | yes (extension cap hit) |" in md


def test_study_sweeps_each_arm_then_runs_its_seeds_at_the_chosen_rate(tmp_path):
    from pipeline.study import execute_study

    folder, runs = _stub_study(tmp_path), tmp_path / "runs"
    stub = StubRuns(runs)
    execute_study(_plan(folder, runs), 1, stub)
    assert sorted(stub.names(), key=str) == sorted(EXPECTED, key=str)  # each once
    _check_order(stub.calls)
    # seed-major: no arm's second seed before every arm's first seed at its chosen rate
    order = [run for run, stages in stub.names() if stages is None]
    assert max(order.index(r) for r in order if r.endswith("-s0")) < min(order.index(r) for r in order
                                                                          if r.endswith("-s1"))
    # the chosen rate's min_lr keeps the recipe's ratio (1e-4 / 2e-3), and the seed reached the run
    plan = _plan(folder, runs)
    r = load_recipe(folder / "lo.yaml", list(plan.final_runs(plan.arms[2])[1].extra))
    assert (r.run.name, r.run.seed, r.distill.train.optim.lr) == ("lo-lr2.5e-4-s1", 1, 2.5e-4)
    assert r.distill.train.optim.min_lr == pytest.approx(2.5e-4 * 0.05, rel=1e-12)

    _check_table(plan, tmp_path / "report")

    # resumable: a finished study runs nothing; an interrupted run is the only one rerun
    again = StubRuns(runs)
    execute_study(_plan(folder, runs), 1, again)
    assert again.calls == []
    (runs / "hi-lr8e-3-s1" / "evaluate" / "done.json").unlink()
    (runs / "lo-lr5e-4-s0" / "distill" / "done.json").unlink()
    again = StubRuns(runs)
    execute_study(_plan(folder, runs), 1, again)
    assert sorted(again.names(), key=str) == [("hi-lr8e-3-s1", None), ("lo-lr5e-4-s0", CE)]


def test_a_failed_study_resumes_without_rerunning_finished_points(tmp_path):
    from pipeline.study import execute_study

    folder, runs = _stub_study(tmp_path), tmp_path / "runs"
    first = StubRuns(runs, fail={"lo-lr5e-4-s0"})
    with pytest.raises(RuntimeError, match="stub failure"):
        execute_study(_plan(folder, runs), 1, first)
    assert ("lo-lr2.5e-4-s0", CE) not in first.names()  # the extension past a failed point never started
    second = StubRuns(runs)
    execute_study(_plan(folder, runs), 1, second)
    assert not set(first.names()) & set(second.names())
    # the second pass builds (finds) the shared cache with the first kd run it has left, which then trains
    build = "prepare,teacher_cache"
    assert [(r, s) for r, s in second.names() if s == build] == [("kd-lr2e-3-s1", build)]
    assert {x for x in set(first.names()) | set(second.names()) if x[1] != build} == {
        x for x in EXPECTED if x[1] != build}


def test_study_with_two_jobs_builds_the_cache_first_and_never_idles_a_slot(tmp_path):
    """Two slots: while the cache builds, the other slot runs sweep points of arms without a cache (the build
    waits until one has started: a scheduler that parked a cache reader in that slot would time out)."""
    from pipeline.study import execute_study

    folder, runs = _stub_study(tmp_path), tmp_path / "runs"
    other_started = threading.Event()

    def hold(run, stages):
        if stages == "prepare,teacher_cache":
            assert other_started.wait(timeout=20), "no other run started while the cache was being built"
        else:
            other_started.set()

    stub = StubRuns(runs, hold=hold)
    execute_study(_plan(folder, runs), 2, stub)
    assert sorted(stub.names(), key=str) == sorted(EXPECTED, key=str)
    _check_order(stub.calls)


def test_a_feature_arm_builds_its_features_once_after_the_shared_logits(tmp_path, monkeypatch):
    """An arm with teacher_cache.features shares the cache folder: the logits are built once (by kd, the first
    arm that reads them), the features once, by sj's first run, after the logits; every other sj run waits for
    them, and no other arm builds or waits for features."""
    from pipeline.study import execute_study

    folder, runs = _stub_study(tmp_path), tmp_path / "runs"
    (folder / "sj.yaml").write_text("base: _base.yaml\nrun: {name: sj}\nteacher_cache: {enabled: true, features: "
                                    "true}\ndistill: {weights: {ea: 0.2, saa: 0.1, sfa: 0.1, sta: 0.3, hta: 0.3}}\n")
    monkeypatch.setitem(CURVES, "sj", CURVES["kd"])
    stub = StubRuns(runs)
    execute_study(_plan(folder, runs), 2, stub)
    builds = [(run, start, end) for run, stages, start, end in stub.calls if stages == "prepare,teacher_cache"]
    assert [run for run, *_ in builds] == ["kd-lr1e-3-s0", "sj-lr1e-3-s0"]
    assert builds[1][1] >= builds[0][2]
    assert all(start >= builds[1][2] for run, stages, start, _ in stub.calls
               if run.startswith("sj-") and stages != "prepare,teacher_cache")
    assert {run.split("-")[0] for run, *_ in stub.calls} == {"hi", "kd", "lo", "sj"}


def test_a_diverged_point_is_the_sweeps_worst_and_is_not_rerun(tmp_path):
    """hi's 8e-3 point stops on non-finite losses: 4e-3 wins inside 1e-3..8e-3, so no 1.6e-2 point is tried."""
    from pipeline.study import execute_study

    folder, runs = _stub_study(tmp_path), tmp_path / "runs"
    stub = StubRuns(runs, diverge={"hi-lr8e-3-s0"})
    execute_study(_plan(folder, runs), 1, stub)
    hi = sorted((x for x in stub.names() if x[0].startswith("hi-")), key=str)
    assert hi == sorted([*((f"hi-lr{x}-s0", CE) for x in ("1e-3", "2e-3", "4e-3", "8e-3")),
                         ("hi-lr4e-3-s0", None), ("hi-lr4e-3-s1", None)], key=str)
    again = StubRuns(runs)
    execute_study(_plan(folder, runs), 1, again)
    assert again.calls == []
    row = next(r for r in _plan(folder, runs).records() if r["arm"] == "hi")
    assert row["chosen_lr"] == 4e-3 and not row["at_edge"]
    assert row["points"][3] == {"lr": 8e-3, "run": "hi-lr8e-3-s0", "val_bpb": None, "diverged": True}
    from pipeline.sweep import sweep_markdown

    assert "| hi | 0 | 1e-3: 11.0000, 2e-3: 6.0000, **4e-3: 3.0000**, 8e-3: diverged | 4e-3 | no |" in sweep_markdown(
        [row])


def test_an_archived_study_goes_on_on_a_fresh_machine_without_rerunning_what_finished(tmp_path):
    """The first machine stops when kd's chosen point (2e-3) is to go on to export and evaluate; its records go to
    the archive as runs end. A second machine starts with no runs directory: it restores the records, runs only
    what was left (the chosen point in full, retraining its distill since no weights were archived, and the
    second seeds), and never a finished sweep point again."""
    import shutil

    from pipeline.study import execute_study
    from pipeline.study_archive import restore_runs

    folder, runs, archive = _stub_study(tmp_path), tmp_path / "runs", tmp_path / "archive"

    def stop(run, stages):
        if (run, stages) == ("kd-lr2e-3-s0", None):
            raise RuntimeError("machine lost")

    first = StubRuns(runs, hold=stop)
    with pytest.raises(RuntimeError, match="machine lost"):
        execute_study(_plan(folder, runs, archive), 1, first)
    finished = {x for x in first.names() if x != ("kd-lr2e-3-s0", None)}
    assert {(r, CE if r.startswith(("hi", "lo")) else KD) for r in (p.name for p in archive.iterdir())} <= finished
    assert {p.name for p in archive.iterdir()} >= {f"kd-lr{x}-s0" for x in ("1e-3", "2e-3", "4e-3")}

    shutil.rmtree(runs)  # the next machine: a fresh clone with the archive
    restored = restore_runs(archive, runs)
    assert sorted(restored) == sorted(p.name for p in archive.iterdir())
    second = StubRuns(runs)
    execute_study(_plan(folder, runs, archive), 1, second)
    assert not {x for x in second.names() if x[1] != "prepare,teacher_cache"} & finished
    assert ("kd-lr2e-3-s0", None) in second.names() and ("kd-lr2e-3-s0", KD) not in second.names()
    assert {x for x in finished | set(second.names()) if x[1] != "prepare,teacher_cache"} == {
        x for x in EXPECTED if x[1] != "prepare,teacher_cache"}
    assert not (runs / "kd-lr2e-3-s0" / "restored.json").exists()
    plan = _plan(folder, runs, archive)
    assert {r["arm"]: r["chosen_lr"] for r in plan.records()} == {"hi": 8e-3, "kd": 2e-3, "lo": 2.5e-4}
    # the archive now holds every run the study reads, and a third machine has nothing left to run
    assert {p.name for p in archive.iterdir()} == {r.run.run for r in plan.finished_runs()}
    shutil.rmtree(runs)
    restore_runs(archive, runs)
    third = StubRuns(runs)
    execute_study(_plan(folder, runs, archive), 1, third)
    assert third.calls == []


def test_restore_keeps_the_furthest_copy_of_a_run_and_archives_records_only(tmp_path):
    from pipeline.study_archive import archive_run, record_files, restore_runs

    run = tmp_path / "runs" / "x-s0"
    for stage in ("prepare", "distill", "evaluate"):
        (run / stage).mkdir(parents=True)
        (run / stage / "done.json").write_text("{}")
        (run / stage / "metrics.jsonl").write_text("{}\n")
    (run / "config.yaml").write_text("run: {}\n")
    (run / "evaluate" / "results.json").write_text("{}")
    (run / "distill" / "student").mkdir()
    (run / "distill" / "student" / "model.safetensors").write_bytes(b"w" * 100)
    (run / "distill" / "checkpoints" / "step-1").mkdir(parents=True)
    (run / "distill" / "checkpoints" / "step-1" / "trainer.json").write_text("{}")
    (run / "prepare" / "dataset").mkdir()
    (run / "prepare" / "dataset" / "meta.json").write_text("{}")
    archive = tmp_path / "archive"
    archive_run(run, archive)
    assert [str(p) for p in record_files(archive / "x-s0")] == [
        "config.yaml", "distill/done.json", "distill/metrics.jsonl", "evaluate/done.json",
        "evaluate/metrics.jsonl", "evaluate/results.json", "prepare/done.json", "prepare/metrics.jsonl"]
    assert sorted(str(p.relative_to(archive)) for p in archive.rglob("*") if p.is_file()) == [
        f"x-s0/{p}" for p in record_files(archive / "x-s0")]  # no weights, checkpoints or datasets

    fresh = tmp_path / "fresh"
    (fresh / "x-s0" / "prepare").mkdir(parents=True)  # an interrupted copy: fewer stages done
    (fresh / "x-s0" / "prepare" / "done.json").write_text('{"local": 1}')
    (fresh / "y-s0" / "distill").mkdir(parents=True)  # not in the archive: left alone
    assert restore_runs(archive, fresh) == ["x-s0"]
    assert (fresh / "x-s0" / "evaluate" / "results.json").is_file()
    assert json.loads((fresh / "x-s0" / "restored.json").read_text())["stages"] == ["distill", "evaluate",
                                                                                    "prepare"]
    assert (fresh / "y-s0" / "distill").is_dir()
    (fresh / "x-s0" / "export").mkdir()  # the local copy went further: kept
    (fresh / "x-s0" / "export" / "done.json").write_text("{}")
    assert restore_runs(archive, fresh) == [] and (fresh / "x-s0" / "export" / "done.json").is_file()
    assert restore_runs(tmp_path / "none", fresh) == []
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match="--archive .*file: not a folder"):
        restore_runs(tmp_path / "file", fresh)


def test_an_unfinished_sweep_is_reported_as_such(tmp_path):
    from pipeline.study import execute_study

    folder, runs = _stub_study(tmp_path), tmp_path / "runs"
    with pytest.raises(RuntimeError):
        execute_study(_plan(folder, runs), 1, StubRuns(runs, fail={"kd-lr4e-3-s0"}))
    plan = _plan(folder, runs)
    kd = next(a for a in plan.arms if a.name == "kd")
    assert plan.final_runs(kd) is None
    row = next(r for r in plan.records() if r["arm"] == "kd")
    assert row["chosen_lr"] is None and row["runs"] == [] and row["points"][2]["val_bpb"] is None


def test_schedule_runs_the_tasks_that_work_returns_by_priority_and_refuses_unmeetable_needs():
    from pipeline.errors import PipelineError
    from pipeline.study import Task, _schedule

    order = []

    def step(name, then=()):
        def work():
            order.append(name)
            return list(then)
        return work

    late = Task("late", set(), step("late"), 1)
    _schedule([Task("a", set(), step("a", [Task("a2", {"a"}, step("a2"), 0), late])), Task("b", set(), step("b"), 2)],
              jobs=1)
    assert order == ["a", "a2", "late", "b"]  # a's tasks join the queue; lower priority first
    with pytest.raises(PipelineError, match="x wait for tasks that never ran"):
        _schedule([Task("x", {"never"}, step("x"))], jobs=2)


def test_with_cache_all_cores_a_build_runs_alone_on_every_slot(tmp_path):
    """cache_slots=2 of 2: the build waits for no running run (none started before it: it is first in the
    queue), nothing starts until it ends, and it is handed both slots; every other run one slot."""
    from pipeline.study import execute_study

    folder, runs = _stub_study(tmp_path), tmp_path / "runs"
    stub = StubRuns(runs, hold=lambda run, stages: time.sleep(0.05 if stages == "prepare,teacher_cache" else 0.01))
    execute_study(_plan(folder, runs), 2, stub, cache_slots=2)
    assert sorted(stub.names(), key=str) == sorted(EXPECTED, key=str)
    _check_order(stub.calls)
    (build,) = [c for c in stub.calls if c[1] == "prepare,teacher_cache"]
    overlapping = [c[:2] for c in stub.calls if c is not build and c[2] < build[3] and c[3] > build[2]]
    assert overlapping == []
    assert stub.slots.pop((build[0], build[1])) == 2 and set(stub.slots.values()) == {1}


def test_a_task_of_two_slots_waits_for_both_and_keeps_them_from_later_tasks():
    """Slot accounting by hand: x (1 slot) runs; the 2-slot build, first in priority, waits for x to end, and
    y (1 slot, ready all along) does not take the free slot meanwhile; y runs after the build."""
    from pipeline.study import Task, _schedule

    log = []

    def step(name, seconds=0.02):
        def work():
            log.append(f"{name}+")
            time.sleep(seconds)
            log.append(f"{name}-")
        return work

    # x runs 0.1 s: the build and y are queued and ready meanwhile, with one slot free
    _schedule([Task("x", set(), step("x", 0.1), -2), Task("build", set(), step("build"), -1, 2),
               Task("y", set(), step("y"), 0)], jobs=2)
    assert log == ["x+", "x-", "build+", "build-", "y+", "y-"]


def test_a_study_run_gets_a_fixed_thread_count(monkeypatch):
    """With one job too: the thread governor would vary the count with the load, and so the sums of a rerun."""
    from pipeline.study import _thread_env
    from students.ops.threads import available_cores

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert _thread_env(1)["OMP_NUM_THREADS"] == str(available_cores())
    assert _thread_env(2)["OMP_NUM_THREADS"] == str(max(1, available_cores() // 2))
    assert _thread_env(2, slots=2)["OMP_NUM_THREADS"] == str(max(1, available_cores() // 2) * 2)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert _thread_env(1)["OMP_NUM_THREADS"] == "3"


def test_a_budget_series_survives_each_budgets_own_learning_rate():
    """The leaderboard's series (token-efficiency plot, goal (ii)) groups runs that differ only in budget and
    seed; each budget's swept learning rate (lr, min_lr) must not split it, and a different objective must."""
    from eval.leaderboard import series_key

    def config(steps, lr, sta=0.3):
        return {"run": {"name": f"x-{steps}-{lr}", "seed": 1},
                "distill": {"train": {"steps": steps, "optim": {"lr": lr, "min_lr": lr * 0.05, "warmup_steps": 4}},
                            "weights": {"sta": sta, "hta": 0.3}}}

    assert series_key(config(584, 2e-3)) == series_key(config(146, 8e-3))
    assert series_key(config(584, 2e-3)) != series_key(config(584, 2e-3, sta=0.0))


# ---------------------------------------------------------------- a tiny real study

TINY_BASE = """\
run: {{seed: 0, runs_dir: {runs}}}
study: {{seeds: [0], lr_grid: [1.0e-3, 1.0e-2, 1.0e-1], lr_extensions: 1}}
data: {{sources: [{corpus}], seq_len: 16, val_fraction: 0.1, split_seed: 0}}
teacher: {{spec: {teacher}, dtype: fp32}}
student: {{preset: tiny, config: {{n_layer: 1, d_model: 16, n_head: 2}}}}
teacher_cache: {{enabled: false, k: 4, value_dtype: fp32, batch_size: 4, dir: {cache}}}
align: {{enabled: false}}
distill:
  train: {{steps: 4, batch_size: 2, eval_every: 2, eval_batches: 1, checkpoint_every: 4, log_every: 1,
           optim: {{lr: 1.0e-2, min_lr: 1.0e-3}}}}
  weights: {{sta: 0.0, hta: 1.0}}
  kd: {{chunk_size: 8}}
evaluate: {{texts: [persuasion], max_text_bytes: 200, context_length: 32, energy: false, teacher: false,
           sample_tokens: 0}}
"""


@pytest.mark.slow
def test_a_tiny_study_sweeps_chooses_by_validation_and_resumes(tmp_path, tiny_teacher_dir):
    """Two tiny arms over the tiny teacher, a 3-point grid: the matched Llama with weight inheritance and
    cached KD (two seeds), and a CE-only spiking student; real `spikedistill run` processes, two at a time."""
    from pipeline.cli import main
    from pipeline.runner import read_done

    (tmp_path / "corpus.txt").write_text("It is a truth universally acknowledged, that a single man in "
                                         "possession of a good fortune, must be in want of a wife. " * 30)
    folder, runs, report = tmp_path / "study", tmp_path / "runs", tmp_path / "report"
    folder.mkdir()
    (folder / "_base.yaml").write_text(TINY_BASE.format(runs=runs, corpus=tmp_path / "corpus.txt",
                                                        teacher=tiny_teacher_dir, cache=tmp_path / "cache"))
    (folder / "a_ann_kd.yaml").write_text(
        "base: _base.yaml\nrun: {name: a_ann_kd}\nstudy: {seeds: [0, 1]}\n"
        "student: {arch: llama, init_from_teacher: true}\nteacher_cache: {enabled: true}\n"
        "distill: {weights: {sta: 0.5, hta: 0.5}}\n")
    (folder / "b_ce.yaml").write_text("base: _base.yaml\nrun: {name: b_ce}\n")
    assert main(["study", str(folder), "--out", str(report), "--jobs", "2"]) == 0

    sweep = {a["arm"]: a for a in json.loads((report / "sweep.json").read_text())["arms"]}
    finals = {}
    for arm, row in sweep.items():
        points = {p["lr"]: p for p in row["points"]}
        assert len(points) in (3, 4) and row["extensions"] == len(points) - 3
        for lr, p in points.items():  # the table's numbers are the runs' own validation bits/byte
            done = read_done(runs / p["run"] / "distill")
            assert p["val_bpb"] == done["metrics"]["val_bits_per_byte"] and math.isfinite(p["val_bpb"])
        best = min(points, key=lambda lr: (points[lr]["val_bpb"], lr))
        assert row["chosen_lr"] == best
        assert row["at_edge"] == (best in (min(points), max(points)))
        for lr, p in points.items():  # only the chosen point went on to export and evaluate
            assert (runs / p["run"] / "evaluate").is_dir() == (lr == best)
        finals.update({r["run"]: (arm, r["seed"], best) for r in row["runs"]})
    best_a = lr_label(sweep["a_ann_kd"]["chosen_lr"])
    assert set(finals) == {f"a_ann_kd-lr{best_a}-s0", f"a_ann_kd-lr{best_a}-s1",
                           f"b_ce-lr{lr_label(sweep['b_ce']['chosen_lr'])}-s0"}
    summary = json.loads((report / "summary.json").read_text())
    assert sorted((r["arm"], r["seed"], r["kind"]) for r in summary) == [
        ("a_ann_kd", 0, "ann_kd"), ("a_ann_kd", 1, "ann_kd"), ("b_ce", 0, "snn_ce")]
    for run, (arm, seed, lr) in finals.items():
        recipe = load_recipe(runs / run / "config.yaml")
        assert (recipe.run.seed, recipe.distill.train.optim.lr) == (seed, lr)
        assert read_done(runs / run / "evaluate")["metrics"]["bpb_persuasion"] > 0
    # the distilled Llama trained on the cached KD term and started from the teacher's embedding projection
    a0 = read_done(runs / f"a_ann_kd-lr{best_a}-s0" / "distill")["metrics"]
    assert a0["kd"] > 0 and a0["ce"] > 0
    assert (report / "sweep.md").read_text().count("| a_ann_kd | 0 |") == 1

    stamps = {p: p.stat().st_mtime_ns for p in runs.glob("*/*/done.json")}
    assert main(["study", str(folder), "--out", str(report)]) == 0  # resumable: nothing reruns
    assert {p: p.stat().st_mtime_ns for p in runs.glob("*/*/done.json")} == stamps
    (report / "summary.json").unlink()
    assert main(["study", str(folder), "--out", str(report), "--report-only"]) == 0
    assert json.loads((report / "summary.json").read_text()) == summary


def test_study_command_passes_archive_and_cache_all_cores(monkeypatch, tmp_path):
    import pipeline.study
    from pipeline.cli import main

    seen = {}

    def fake_run_study(folder, out, **kw):
        seen.update(kw, folder=folder)
        return {"rows": [], "files": {}}

    monkeypatch.setattr(pipeline.study, "run_study", fake_run_study)
    monkeypatch.setattr("eval.cli.print_leaderboard", lambda board: None)
    assert main(["study", "recipes/study", "--archive", str(tmp_path), "--cache-all-cores", "--jobs", "2"]) == 0
    assert (seen["archive"], seen["cache_all_cores"], seen["jobs"]) == (str(tmp_path), True, 2)
    assert main(["study", "recipes/study"]) == 0
    assert (seen["archive"], seen["cache_all_cores"]) == (None, False)
