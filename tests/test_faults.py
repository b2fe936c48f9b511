"""Fault injection (issue 7): kills, corrupt checkpoints, pre-emption, disk full, NaN and concurrent runs.

Every test drives the real `spikedistill run` on a tiny recipe (tiny random Llama teacher, 58 rows of 16
tokens, 2 align + 6 distill steps). Kills and SIGTERM happen in a child process started through
tests/fault_scripts/inject.py, which patches one function to kill itself at a chosen point; reruns and
the reference run happen in-process (the same code, without the start-up cost).
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent / "fault_scripts"))
from common import INJECT, ROOT, STAGES, cli, file_hashes, write_recipe

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_teacher_dir) -> Path:
    return write_recipe(tmp_path_factory.mktemp("recipe"), tiny_teacher_dir)


def small_shards(mp: pytest.MonkeyPatch) -> None:
    """In-process twin of inject.py's small_shards: 4 rows per cache shard, so the cache has 15 shards."""
    from teachers import cache

    build = cache.build_teacher_cache
    mp.setattr(cache, "build_teacher_cache", lambda *a, **kw: build(*a, **{**kw, "shard_size": 4}))


def run_main(args: list[str], mp: pytest.MonkeyPatch | None = None) -> int:
    """`spikedistill ARGS` in this process (cache shards of 4 rows, as in the child runs)."""
    from pipeline.cli import main

    with pytest.MonkeyPatch.context() as patch:
        small_shards(mp or patch)
        return main(args)


@pytest.fixture(scope="module")
def reference(recipe, tmp_path_factory) -> Path:
    """One uninterrupted run of prepare, teacher_cache, align and distill."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    assert run_main(["run", str(recipe), "--run-dir", str(run_dir), "--stages", STAGES]) == 0
    return run_dir


def error_line(stderr: str) -> str:
    """The CLI's one error line (progress bars share stderr); there must be exactly one."""
    lines = re.findall(r"spikedistill: error: [^\r\n]*", stderr)
    assert len(lines) == 1, stderr[-2000:]
    assert "Traceback" not in stderr
    return lines[0]


def weights(run_dir: Path, stage: str = "distill") -> bytes:
    return (run_dir / stage / "student" / "model.safetensors").read_bytes()


def steps_of(run_dir: Path, stage: str = "distill") -> list[int]:
    from pipeline import checkpoint as ckpt

    return [s for s, _ in ckpt.list_checkpoints(run_dir / stage / "checkpoints")]


def finish(recipe: Path, run_dir: Path, *extra: str) -> None:
    """Rerun the same command in-process; it must complete."""
    assert run_main(["run", str(recipe), "--run-dir", str(run_dir), "--stages", STAGES, *extra]) == 0


# ------------------------------------------------------------------------------------------------ 1
def test_sigkill_during_training_resumes_bit_identical(recipe, reference, tmp_path):
    step = random.Random(7).randint(3, 6)  # a "random" distill step, fixed by the seed
    run_dir = tmp_path / "run"
    killed = cli(["run", str(recipe), "--run-dir", str(run_dir), "--stages", STAGES], "kill_step", step)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (run_dir / "distill" / "done.json").exists()
    assert (run_dir / "align" / "done.json").exists()
    assert steps_of(run_dir) == [s for s in (2, 4) if s < step][-2:]
    finish(recipe, run_dir)
    assert weights(run_dir) == weights(reference)


# ------------------------------------------------------------------------------------------------ 2
def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(recipe, reference, tmp_path, caplog):
    from pipeline import checkpoint as ckpt

    run_dir = tmp_path / "run"
    killed = cli(["run", str(recipe), "--run-dir", str(run_dir), "--stages", STAGES], "kill_ckpt", 6)
    assert killed.returncode == -signal.SIGKILL
    root = run_dir / "distill" / "checkpoints"
    assert steps_of(run_dir) == [2, 4]  # the half-written step 6 is only a temp folder
    assert (root / ".tmp-step-0000006" / "model.safetensors").is_file()
    assert all(ckpt.verify(folder) is None for _, folder in ckpt.list_checkpoints(root))
    # also truncate the newest complete one: it must be detected, reported and skipped for step 2
    model = root / "step-0000004" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:-100])
    assert "truncated" in ckpt.verify(root / "step-0000004")
    with caplog.at_level("INFO"):
        finish(recipe, run_dir)
    assert "step-0000004 skipped" in caplog.text and "truncated" in caplog.text
    assert "resumed from" in caplog.text and "step-0000002" in caplog.text
    assert weights(run_dir) == weights(reference)


def test_corrupt_checkpoint_bytes_are_detected_by_checksum(recipe, reference, tmp_path):
    from pipeline import checkpoint as ckpt

    root = reference / "distill" / "checkpoints"
    copy = tmp_path / "step-0000006"
    shutil.copytree(root / "step-0000006", copy)
    data = bytearray((copy / "optimizer.pt").read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte
    (copy / "optimizer.pt").write_bytes(bytes(data))
    assert "sha256" in ckpt.verify(copy)


# ------------------------------------------------------------------------------------------------ 3
def test_sigkill_in_prepare_and_teacher_cache_then_rerun_matches(recipe, reference, tmp_path):
    run_dir = tmp_path / "run"
    args = ["run", str(recipe), "--run-dir", str(run_dir), "--stages", "prepare,teacher_cache"]
    killed = cli(args, "kill_prepare")
    assert killed.returncode == -signal.SIGKILL
    assert not (run_dir / "prepare" / "done.json").exists() and not (run_dir / "prepare" / "dataset").exists()
    killed = cli(args, "kill_cache", 2)  # prepare completes; shards 0-2 are written, shard 3 half
    assert killed.returncode == -signal.SIGKILL
    cache = run_dir / "teacher_cache" / "cache"
    assert sorted(p.name for p in cache.glob("shard_*")) == [f"shard_{i:05d}.safetensors" for i in range(3)]
    assert list(cache.glob(".shard_00003*"))  # the half-written shard is under a temp name only
    assert not (run_dir / "teacher_cache" / "done.json").exists()
    assert run_main(args) == 0
    assert not list(cache.glob(".shard_*"))
    ref_meta = json.loads((reference / "prepare" / "dataset" / "meta.json").read_text())
    meta = json.loads((run_dir / "prepare" / "dataset" / "meta.json").read_text())
    assert meta["tokens"] == ref_meta["tokens"] and meta["n_seqs"] == ref_meta["n_seqs"]
    assert meta["data_hash"] == ref_meta["data_hash"]
    done = json.loads((run_dir / "teacher_cache" / "done.json").read_text())["metrics"]
    ref_done = json.loads((reference / "teacher_cache" / "done.json").read_text())["metrics"]
    assert done["shards_written"] == 12 and done["tokens"] == ref_done["tokens"]
    assert file_hashes(cache).keys() == file_hashes(reference / "teacher_cache" / "cache").keys()
    from safetensors.torch import load_file

    for name in (p.name for p in cache.glob("shard_*")):
        mine, ref = load_file(cache / name), load_file(reference / "teacher_cache" / "cache" / name)
        assert mine.keys() == ref.keys() and all(torch.equal(mine[k], ref[k]) for k in ref)


# ------------------------------------------------------------------------------------------------ 4
def test_sigterm_checkpoints_and_exits_143_then_resumes(recipe, reference, tmp_path):
    run_dir = tmp_path / "run"
    term = cli(["run", str(recipe), "--run-dir", str(run_dir), "--stages", STAGES], "term_step", 3)
    assert term.returncode == 143, term.stderr[-2000:]
    assert "SIGTERM received; checkpoint written at step 3" in term.stderr
    assert "stopped by SIGTERM: stage distill stopped; its last checkpoint is step 3 of 6" in term.stderr
    assert re.search(r"^resume with: \S*spikedistill run ", term.stderr, flags=re.MULTILINE), term.stderr[-2000:]
    assert steps_of(run_dir) == [2, 3]
    assert not (run_dir / "distill" / "done.json").exists()
    assert not (run_dir / "lock").exists()  # released on the way out
    finish(recipe, run_dir)
    assert weights(run_dir) == weights(reference)


# ------------------------------------------------------------------------------------------------ 5
def _enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("target", ["prepare", "cache", "checkpoint", "export"])
def test_disk_full_is_one_error_and_nothing_is_marked_done(recipe, tmp_path, capsys, target):
    from safetensors import torch as st

    from pipeline import checkpoint as ckpt
    from teachers import cache, data

    run_dir = tmp_path / "run"
    order = ["prepare", "teacher_cache", "align", "distill", "export"]
    stage = {"prepare": "prepare", "cache": "teacher_cache", "checkpoint": "distill", "export": "export"}[target]
    earlier = order[:order.index(stage)]
    if earlier:  # the stages before the one that hits the full disk finish first
        assert run_main(["run", str(recipe), "--run-dir", str(run_dir), "--stages", ",".join(earlier)]) == 0
    before = file_hashes(run_dir) if run_dir.exists() else {}
    capsys.readouterr()
    with pytest.MonkeyPatch.context() as mp:
        if target == "prepare":
            mp.setattr(data, "_write_split", _enospc)
        elif target == "cache":
            mp.setattr(cache, "save_file", _enospc)
        elif target == "checkpoint":  # step 2's checkpoint is written, step 4's hits the full disk
            save = ckpt._save_torch
            mp.setattr(ckpt, "_save_torch", lambda obj, path: _enospc() if "0000004" in path.parent.name
                       else save(obj, path))
        else:  # every safetensors write, as save_pretrained does when the model is exported
            import transformers.modeling_utils as mu

            mp.setattr(st, "save_file", _enospc)
            mp.setattr(mu, "safe_save_file", _enospc)
        code = run_main(["run", str(recipe), "--run-dir", str(run_dir), "--stages", stage], mp)
    err = error_line(capsys.readouterr().err)
    assert code == 2, err
    assert "No space left on device" in err, err
    assert not (run_dir / stage / "done.json").exists()
    after = file_hashes(run_dir)
    assert {k: v for k, v in after.items() if k in before} == before  # earlier outputs untouched
    assert not (run_dir / "lock").exists()
    if target == "checkpoint":  # the checkpoint written before the disk filled up is intact
        assert steps_of(run_dir) == [2]
        assert ckpt.verify(run_dir / "distill" / "checkpoints" / "step-0000002") is None


# ------------------------------------------------------------------------------------------------ 6
def _nan_at(steps: set[int]):
    from pipeline import trainer

    original = trainer.Trainer._train_step

    def step(self):
        if self.name != "distill" or self.step + 1 not in steps:
            return original(self)
        forward = self.model.forward
        self.model.forward = lambda **b: {**(o := forward(**b)), "loss": o["loss"] * float("nan")}
        try:
            return original(self)
        finally:
            self.model.forward = forward

    return step


def test_a_nan_step_is_skipped_and_counted(recipe, tmp_path):
    from pipeline import trainer

    run_dir = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer.Trainer, "_train_step", _nan_at({3}))
        assert run_main(["run", str(recipe), "--run-dir", str(run_dir), "--stages", STAGES], mp) == 0
    rows = [json.loads(x) for x in (run_dir / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in rows if r["split"] == "train"] == [0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    assert json.loads((run_dir / "distill" / "done.json").read_text())["metrics"]["bad_steps"] == 1.0


def test_k_consecutive_nan_steps_stop_with_a_clear_message(recipe, tmp_path, capsys):
    from pipeline import trainer

    run_dir = tmp_path / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(trainer.Trainer, "_train_step", _nan_at({3, 4, 5, 6}))
        code = run_main(["run", str(recipe), "--run-dir", str(run_dir), "--stages", STAGES], mp)
    err = error_line(capsys.readouterr().err)
    assert code == 2
    assert "NaN/inf for 3 consecutive steps" in err and "step-0000002" in err and "optim.lr" in err
    assert steps_of(run_dir) == [2]  # no checkpoint inside the bad run: the last good one stays newest
    assert not (run_dir / "distill" / "done.json").exists()


# ------------------------------------------------------------------------------------------------ 7
def test_second_process_is_refused_and_a_stale_lock_is_taken_over(recipe, reference, tmp_path, capsys, caplog):
    run_dir = tmp_path / "run"
    args = ["run", str(recipe), "--run-dir", str(run_dir), "--stages", STAGES]
    flag = tmp_path / "paused"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "INJECT_PAUSE_FLAG": str(flag)}
    first = subprocess.Popen([sys.executable, str(INJECT), "pause_step", "3", "--", *args], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 90
        while not flag.exists():
            assert first.poll() is None and time.monotonic() < deadline, "the first run never reached step 3"
            time.sleep(0.1)
        assert run_main(args) == 2
        err = capsys.readouterr().err
        assert f"in use by pid {first.pid}" in err and "wait for that run to end" in err
        assert not (run_dir / "distill" / "done.json").exists()
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert (run_dir / "lock").read_text().split()[0] == str(first.pid)  # left behind by the killed run
    with caplog.at_level("WARNING"):
        finish(recipe, run_dir)
    assert "stale lock" in caplog.text and f"dead pid {first.pid}" in caplog.text
    assert weights(run_dir) == weights(reference)
    assert not (run_dir / "lock").exists()
