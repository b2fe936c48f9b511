"""bench/gpu_check.py where no GPU is: `make gpu-check` says it was skipped and exits 0; the CPU rehearsal runs
the check's parity, timing and distill code (Triton interpreted, datasets / lm-eval / DeepSpeed hidden as on
the GPU machine) and its comparisons fail on a broken kernel; bench/gpu_wheels.py plans the lock's versions."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA machine runs the real check")
def test_make_gpu_check_without_cuda_says_skipped_and_exits_0(tmp_path):
    proc = subprocess.run(["make", "-s", "gpu-check", f"PY={sys.executable}", f"OUT={tmp_path / 'out'}"],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=120, check=False)  # fmt: skip
    lines = proc.stdout.strip().splitlines()
    assert proc.returncode == 0, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("gpu-check skipped: no CUDA device"), proc.stdout
    assert not (tmp_path / "out").exists() and "venv" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_cpu_rehearsal_runs_every_section_but_the_gpu(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "bench.gpu_check", str(out), "--work", str(tmp_path / "work"), "--device", "cpu",
           "--triton-interpret", "--quick",
           "--sections", "environment,parity,timing,distill,deepspeed", "--hide-packages",
           "datasets,lm_eval,deepspeed"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600, check=False)
    report = json.loads((out / "gpu_check.json").read_text())
    sections = report["sections"]
    assert proc.returncode == 0, json.dumps({k: v.get("error") for k, v in sections.items()}) + proc.stderr[-3000:]
    assert {k: v["status"] for k, v in sections.items()} == {"environment": "passed", "parity": "passed",
                                                            "timing": "passed", "distill": "passed",
                                                            "deepspeed": "skipped"}  # fmt: skip
    assert sections["environment"]["data"]["installed"]["deepspeed"] is not None  # installed, yet hidden
    cases = {(c["case"], c["dtype"]) for c in sections["parity"]["data"]["cases"]}
    assert {"lif", "wkv", "sfsa", "linear_ce", "token_shift_lif"} <= {name for name, _ in cases}
    assert {dtype for _, dtype in cases} == {"float32", "bfloat16"}
    distill = sections["distill"]["data"]
    assert distill["steps"] == 3 and distill["finite"] and "mixed_precision=bf16" in distill["command"]
    assert "| parity case |" in (out / "gpu_check.md").read_text() and (out / "bf16.log").is_file()
    assert not (out / "work").exists() and (tmp_path / "work" / "teacher" / "config.json").is_file()


@pytest.mark.slow
def test_a_broken_kernel_fails_the_parity_and_the_exit_code(tmp_path):
    # the rehearsal's comparison is not vacuous: a LIF kernel whose leak is off by 1% fails it
    script = (
        "import sys, students.ops.lif.triton as t\n"
        "real = t.lif_scan_triton\n"
        "t.lif_scan_triton = lambda x, v0=None, **kw: real(x, v0, **{**kw, 'tau': kw.get('tau', 2.0) * 1.01})\n"
        "from bench.gpu_check import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    out = tmp_path / "out"
    env = {**_env(), "TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", script, str(out), "--work", str(tmp_path / "work"), "--device", "cpu",
                           "--quick", "--sections", "parity", "--cases", "lif,relu_square_lif,wkv"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600, check=False)  # fmt: skip
    report = json.loads((out / "gpu_check.json").read_text())
    ok = {(c["case"], c["dtype"]): c["ok"] for c in report["sections"]["parity"]["data"]["cases"]}
    # the cases that run the LIF kernel fail (itself, and a fused producer composed with it on CUDA); WKV passes
    assert ok == {(case, dtype): case == "wkv" for case in ("lif", "relu_square_lif", "wkv")
                  for dtype in ("float32", "bfloat16")}, ok  # fmt: skip
    assert proc.returncode == 1


def test_wheel_plan_pins_the_lock_versions():
    from bench.gpu_wheels import GPU_MACHINE, commands, plan

    lock = (ROOT / "requirements" / "lock.txt").read_text()
    pinned = {m.group(1).lower().replace("_", "-"): m.group(2)
              for m in re.finditer(r"^([A-Za-z0-9][\w.-]*)==([^\s\\;+]+)", lock, flags=re.MULTILINE)}  # fmt: skip
    wheels = dict(plan())
    # omegaconf for the recipes; DeepSpeed and what it needs that the GPU machine lacks (pydantic comes there
    # only through huggingface-hub's CLI, not promised)
    assert {"omegaconf", "deepspeed", "pydantic", "pydantic-core", "hjson", "py-cpuinfo", "ninja"} <= set(wheels)
    assert not set(wheels) & {*GPU_MACHINE, "packaging", "psutil", "typing-extensions", "huggingface-hub"}
    assert wheels == {name: pinned[name] for name in wheels}
    argv = [" ".join(cmd) for cmd, _ in commands(list(wheels.items()), Path(".whl"))]
    assert all(any(f"{n}=={v}" in a for a in argv) for n, v in wheels.items())
    assert all("--only-binary=:all:" in a and "--python-version 3.12" in a for a in argv if " download " in a)
    assert [a for a in argv if " wheel " in a] == [a for a in argv if "deepspeed==" in a]
