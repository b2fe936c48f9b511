"""Stage runner: done.json, skip / rerun with reasons, config refusal, missing upstream, lock, atomicity.

Every stage is a stub registered for the test (fast); the real stages run in test_demo_integration.py.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

import pipeline.runner as runner_mod
from pipeline.errors import ConfigError, PipelineError, StageError
from pipeline.recipe import load_recipe
from pipeline.runner import RunLock, read_done, run_pipeline
from pipeline.stages import STAGE_ORDER, StageResult, register_stage


class Stubs:
    """Stub stages that write one file each and record which ran; `fail` makes one raise."""

    def __init__(self):
        self.calls: list[str] = []
        self.fail: str | None = None
        self.contexts: dict = {}

    def make(self, name):
        def run(ctx):
            self.calls.append(name)
            self.contexts[name] = ctx
            if self.fail == name:
                raise RuntimeError(f"{name} failed on purpose")
            out = ctx.stage_dir / f"{name}.out"
            out.write_text(json.dumps(sorted(ctx.upstream)))
            return StageResult(outputs={"main": str(out)}, metrics={"value": len(name)})
        return run


@pytest.fixture
def stubs(monkeypatch):
    s = Stubs()
    for name in STAGE_ORDER:
        register_stage(name, s.make(name))
    monkeypatch.setattr(runner_mod, "make_accelerator", lambda recipe, train=None: None)
    yield s
    for name in STAGE_ORDER:
        register_stage(name, None)


def _recipe(*overrides):
    return load_recipe(None, ["run.name=t", *overrides])


FULL = ["prepare", "align", "distill", "export", "evaluate"]


def test_full_run_writes_done_json_and_config(tmp_path, stubs):
    rows = run_pipeline(_recipe(), run_dir=tmp_path)
    assert stubs.calls == FULL and [r.status for r in rows] == ["ran"] * 5
    assert load_recipe(tmp_path / "config.yaml") == _recipe()
    done = read_done(tmp_path / "distill")
    assert set(done) >= {"stage", "config_hash", "inputs", "outputs", "metrics", "finished_at"}
    assert set(done["inputs"]) == {"prepare", "align"} and done["metrics"] == {"value": 7}
    assert Path(done["outputs"]["main"]).is_file()
    assert sorted(stubs.contexts["export"].upstream) == ["distill", "prepare"]
    assert not (tmp_path / "lock").exists()
    assert not list(tmp_path.rglob("*.tmp-*"))


def test_rerun_skips_everything(tmp_path, stubs):
    run_pipeline(_recipe(), run_dir=tmp_path)
    stubs.calls.clear()
    rows = run_pipeline(_recipe(), run_dir=tmp_path)
    assert stubs.calls == [] and {r.status for r in rows} == {"skipped"}
    assert rows[2].metrics == {"value": 7}


def test_changed_config_reruns_that_stage_and_later(tmp_path, stubs, caplog):
    run_pipeline(_recipe(), run_dir=tmp_path)
    stubs.calls.clear()
    with caplog.at_level(logging.INFO, logger="spikedistill"):
        rows = run_pipeline(_recipe("distill.train.steps=9"), run_dir=tmp_path, resume=True)
    assert stubs.calls == ["distill", "export", "evaluate"]
    reasons = {r.name: r.reason for r in rows}
    assert reasons["distill"] == "config changed: distill.train.steps"
    assert reasons["export"] == "input changed: distill" and reasons["prepare"] == "unchanged"
    assert "[distill] running (config changed: distill.train.steps)" in caplog.text


def test_data_change_reruns_everything(tmp_path, stubs):
    run_pipeline(_recipe(), run_dir=tmp_path)
    stubs.calls.clear()
    run_pipeline(_recipe("data.seq_len=64"), run_dir=tmp_path, resume=True)
    assert stubs.calls == FULL


def test_different_config_is_refused_without_resume_or_force(tmp_path, stubs):
    run_pipeline(_recipe(), run_dir=tmp_path)
    with pytest.raises(ConfigError) as info:
        run_pipeline(_recipe("distill.kd.temperature=1.0"), run_dir=tmp_path)
    msg = str(info.value)
    assert "distill.kd.temperature" in msg and "--resume" in msg and "--force" in msg and "\n" not in msg
    assert load_recipe(tmp_path / "config.yaml").distill.kd.temperature == 2.0


def test_force_reruns_requested_stages(tmp_path, stubs):
    run_pipeline(_recipe(), run_dir=tmp_path)
    stubs.calls.clear()
    rows = run_pipeline(_recipe(), run_dir=tmp_path, stages=["export", "evaluate"], force=True)
    assert stubs.calls == ["export", "evaluate"] and rows[0].reason == "--force"


def test_rerun_of_an_upstream_invalidates_downstream(tmp_path, stubs):
    run_pipeline(_recipe(), run_dir=tmp_path)
    run_pipeline(_recipe(), run_dir=tmp_path, stages=["prepare"], force=True)
    stubs.calls.clear()
    rows = run_pipeline(_recipe(), run_dir=tmp_path)
    assert stubs.calls == ["align", "distill", "export", "evaluate"]
    assert rows[1].reason == "input changed: prepare"


def test_missing_upstream_is_a_clear_error(tmp_path, stubs):
    with pytest.raises(StageError, match=r"stage distill needs stage prepare, which has not run"):
        run_pipeline(_recipe(), run_dir=tmp_path, stages=["distill"])
    assert stubs.calls == [] and read_done(tmp_path / "distill") is None


def test_outdated_upstream_not_requested_is_refused(tmp_path, stubs):
    run_pipeline(_recipe(), run_dir=tmp_path)
    with pytest.raises(StageError, match=r"needs stage align, whose done.json does not match"):
        run_pipeline(_recipe("align.train.steps=3"), run_dir=tmp_path, stages=["distill"], resume=True)


def test_optional_stages_follow_the_recipe(tmp_path, stubs):
    run_pipeline(_recipe("teacher_cache.enabled=true", "align.enabled=false"), run_dir=tmp_path)
    assert stubs.calls == ["prepare", "teacher_cache", "distill", "export", "evaluate"]
    assert sorted(stubs.contexts["distill"].upstream) == ["prepare", "teacher_cache"]
    with pytest.raises(ConfigError, match=r"align.enabled is false"):
        run_pipeline(_recipe("align.enabled=false"), run_dir=tmp_path / "b", stages=["align"])
    with pytest.raises(ConfigError, match=r"--stages: unknown stage 'trian'"):
        run_pipeline(_recipe(), run_dir=tmp_path / "c", stages=["trian"])


def test_failed_stage_is_not_marked_done_and_resumes(tmp_path, stubs):
    stubs.fail = "distill"
    with pytest.raises(RuntimeError):
        run_pipeline(_recipe(), run_dir=tmp_path)
    assert read_done(tmp_path / "align") is not None and read_done(tmp_path / "distill") is None
    assert not (tmp_path / "lock").exists()
    (tmp_path / "distill" / "checkpoint.marker").write_text("kept for resume")
    stubs.fail, stubs.calls = None, []
    rows = run_pipeline(_recipe(), run_dir=tmp_path)
    assert stubs.calls == ["distill", "export", "evaluate"] and rows[2].reason == "resuming"
    assert (tmp_path / "distill" / "checkpoint.marker").exists()


def test_changed_config_starts_the_stage_folder_clean(tmp_path, stubs):
    stubs.fail = "distill"
    with pytest.raises(RuntimeError):
        run_pipeline(_recipe(), run_dir=tmp_path)
    (tmp_path / "distill" / "checkpoint.marker").write_text("from another config")
    stubs.fail = None
    rows = run_pipeline(_recipe("distill.train.optim.lr=0.01"), run_dir=tmp_path, resume=True)
    assert rows[2].reason == "config changed since the interrupted attempt; starting clean"
    assert not (tmp_path / "distill" / "checkpoint.marker").exists()


def test_bad_stage_result_is_not_marked_done(tmp_path, stubs):
    register_stage("prepare", lambda ctx: StageResult(outputs={"dataset": str(ctx.stage_dir / "nope")}))
    with pytest.raises(StageError, match="outputs that do not exist"):
        run_pipeline(_recipe(), run_dir=tmp_path)
    assert read_done(tmp_path / "prepare") is None


def test_deleted_output_reruns_the_stage(tmp_path, stubs):
    run_pipeline(_recipe(), run_dir=tmp_path)
    (tmp_path / "evaluate" / "evaluate.out").unlink()
    stubs.calls.clear()
    rows = run_pipeline(_recipe(), run_dir=tmp_path)
    assert stubs.calls == ["evaluate"] and rows[-1].reason == "output missing: main"


def test_corrupt_done_json_means_not_done(tmp_path, stubs):
    run_pipeline(_recipe(), run_dir=tmp_path)
    (tmp_path / "export" / "done.json").write_text("{truncated")
    stubs.calls.clear()
    run_pipeline(_recipe(), run_dir=tmp_path)
    assert stubs.calls == ["export", "evaluate"]


def test_live_lock_refuses_a_second_process(tmp_path, stubs):
    tmp_path.mkdir(exist_ok=True)
    holder = RunLock(tmp_path)
    holder.acquire()  # this test process stands in for another live run
    try:
        with pytest.raises(PipelineError, match=r"in use by pid \d+"):
            run_pipeline(_recipe(), run_dir=tmp_path)
    finally:
        holder.release()
    assert stubs.calls == []


def test_stale_lock_of_a_dead_pid_is_taken_over(tmp_path, stubs, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True)
    import socket

    (tmp_path / "lock").write_text(f"{int(dead.stdout)} {socket.gethostname()}\n")
    with caplog.at_level(logging.WARNING, logger="spikedistill"):
        run_pipeline(_recipe(), run_dir=tmp_path)
    assert stubs.calls == FULL and "stale lock" in caplog.text
    assert not (tmp_path / "lock").exists()


def test_non_main_rank_writes_nothing(tmp_path, stubs, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(StageError, match="has not run"):
        run_pipeline(_recipe(), run_dir=tmp_path)
    assert not (tmp_path / "config.yaml").exists()
    assert os.listdir(tmp_path) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_run_dir_is_one_clear_error(tmp_path, stubs):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    try:
        with pytest.raises(PipelineError, match=r"not writable .*--run-dir"):
            run_pipeline(_recipe(), run_dir=parent / "run")
    finally:
        parent.chmod(0o700)


def test_permission_error_on_the_run_dir_is_one_clear_error(tmp_path, stubs, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(PipelineError, match=r"not writable \(Permission denied\)"):
        run_pipeline(_recipe(), run_dir=tmp_path / "run")


def test_distill_hash_covers_the_align_settings_its_own_spad_terms_read():
    """build_spad reads align.head_mapping and align.sfa_target_norm for distill's own SpAD terms too."""
    from pipeline.runner import stage_config_hash

    joint = ["align.enabled=false", "distill.weights.ea=0.2", "distill.weights.saa=0.1"]
    for key in ("align.head_mapping=learned", "align.sfa_target_norm=false"):
        assert stage_config_hash(_recipe(*joint), "distill") != stage_config_hash(_recipe(*joint, key), "distill")
        # without feature terms in distill (and no align stage) those settings reach nothing distill does
        plain = ["align.enabled=false"]
        assert stage_config_hash(_recipe(*plain), "distill") == stage_config_hash(_recipe(*plain, key), "distill")


def test_a_key_the_schema_gained_since_the_run_is_not_a_change(tmp_path, stubs):
    """A config.yaml written before a key existed (here: evaluate.stream and teacher_cache.features removed from
    it) is the same config when the recipe leaves those keys at their defaults; the run is skipped, not refused.
    A key it lacks but the recipe sets to another value is still a change."""
    import yaml

    run_pipeline(_recipe(), run_dir=tmp_path)
    path = tmp_path / "config.yaml"
    old = yaml.safe_load(path.read_text())
    del old["evaluate"]["stream"], old["teacher_cache"]["features"]
    path.write_text(yaml.safe_dump(old, sort_keys=False))
    stubs.calls.clear()
    run_pipeline(_recipe(), run_dir=tmp_path)
    assert stubs.calls == []
    with pytest.raises(ConfigError, match=r"changed: evaluate\.stream"):
        run_pipeline(_recipe("evaluate.stream=false"), run_dir=tmp_path)
