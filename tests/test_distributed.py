"""Real 2-process training on CPU (gloo) with torchrun: DDP, DeepSpeed ZeRO-2 and FSDP2.

Each test launches tests/dist_scripts/train_student.py on 2 ranks (a tiny spiking student distilled from
the tiny random Llama teacher) and judges the run by what it wrote (metrics.jsonl, final.safetensors,
info.json), not only by the exit code: DeepSpeed sometimes aborts at interpreter exit with "terminate
called without an active exception" after finishing correctly (DeepSpeed 0.19.8 with gloo on CPU, seen here).
Slow-marked: every launch pays for importing torch/transformers/accelerate in two fresh processes.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).parent / "dist_scripts" / "train_student.py"
TORCHRUN = Path(sys.executable).with_name("torchrun")


def _launch(teacher: Path, out: Path, strategy: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", str(SCRIPT), "--teacher", str(teacher),
           "--out", str(out), "--strategy", strategy, *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=400, env=env)


def _train_rows(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def _check_written(proc: subprocess.CompletedProcess, out: Path) -> None:
    if not (out / "final.safetensors").is_file():
        pytest.fail(f"the 2-rank run wrote no final weights (rc {proc.returncode}):\n{proc.stderr[-3000:]}")


@pytest.mark.latest
@pytest.mark.parametrize("joint", [False, True], ids=["kd", "joint_spad"])
def test_ddp_two_ranks_equal_one_process_with_the_doubled_batch(tmp_path, tiny_teacher_dir, joint):
    """joint: BiSpikCLM's five terms with their projections; DDP (no find_unused_parameters) would stop at the
    second step if any parameter got no gradient, and the per-token sums make 2 x 2 rows equal 1 x 4."""
    extra = ["--joint"] if joint else []
    proc = _launch(tiny_teacher_dir, tmp_path / "ddp", "ddp", "--batch-size", "2", "--steps", "3", "--lr", "0.03",
                   *extra)
    _check_written(proc, tmp_path / "ddp")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "ddp" / "info.json").read_text())["world_size"] == 2

    sys.path.insert(0, str(SCRIPT.parent))
    import train_student

    threads = torch.get_num_threads()
    try:
        train_student.main(["--teacher", str(tiny_teacher_dir), "--out", str(tmp_path / "one"), "--strategy",
                            "ddp", "--batch-size", "4", "--steps", "3", "--lr", "0.03", *extra])
    finally:
        torch.set_num_threads(threads)
    two, one = load_file(tmp_path / "ddp" / "final.safetensors"), load_file(tmp_path / "one" / "final.safetensors")
    assert two.keys() == one.keys() and joint == any(k.startswith("spad.sfa_proj") for k in one)
    for k in one:  # same rows, same updates; only the order of float sums differs
        torch.testing.assert_close(two[k], one[k], rtol=1e-5, atol=1e-6)
    rows2, rows1 = _train_rows(tmp_path / "ddp"), _train_rows(tmp_path / "one")
    assert [r["tokens"] for r in rows2] == [r["tokens"] for r in rows1] == [60.0] * 3
    for a, b in zip(rows2, rows1):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)


@pytest.mark.parametrize("zero", [1, 2, 3])
def test_deepspeed_two_ranks_completes_and_loss_falls(tmp_path, tiny_teacher_dir, zero):
    pytest.importorskip("deepspeed")
    out = tmp_path / "ds"
    proc = _launch(tiny_teacher_dir, out, "deepspeed", "--zero", str(zero), "--batch-size", "2", "--steps", "8",
                   "--lr", "0.03")
    _check_written(proc, out)
    info = json.loads((out / "info.json").read_text())
    assert info["wrapper"] == "DeepSpeedEngine" and info["world_size"] == 2
    losses = [r["loss"] for r in _train_rows(out)]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    assert min(losses[-3:]) < losses[0]


def test_fsdp_two_ranks_completes(tmp_path, tiny_teacher_dir):
    out = tmp_path / "fsdp"
    proc = _launch(tiny_teacher_dir, out, "fsdp", "--batch-size", "2", "--steps", "3", "--lr", "0.03")
    _check_written(proc, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads((out / "info.json").read_text())
    assert info["wrapper"].startswith("FSDP") and info["world_size"] == 2
    rows = _train_rows(out)
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) and r["skipped"] == 0.0 for r in rows)
    # the gathered state dict holds full (unsharded) tensors
    state = load_file(out / "final.safetensors")
    assert state["student.emb.weight"].shape == (320, 16)
