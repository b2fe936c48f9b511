"""Estimated against measured peak memory of training stages (pipeline.memory), case by case.

    .venv/bin/python -m bench.memory [--cases demo-align,demo-distill,...] [--steps 2] [--out DIR]

Each case prepares its data once, then runs ONE stage (`spikedistill run ... --stages STAGE`) in a fresh
process for a few steps and reads that process's peak resident set (VmHWM in /proc/self/status) at exit; the
estimate is pipeline.memory.estimate_stage for the same recipe, as the run's pre-flight check computes it. The
peak of a stage is reached in its first steps (same batch shapes every step), so a few steps measure it.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "recipes" / "demo.yaml")
SMALL = str(ROOT / "recipes" / "smollm2-spikegpt-small-cpu.yaml")
STUDY = str(ROOT / "recipes" / "study") + "/"
TINY = "data.max_train_tokens=20000"  # the stage's memory does not depend on how much data there is
FEW = "data.max_train_tokens=100000"
# name -> (recipe, overrides, stage, stages run before it)
CASES = {
    "demo-align": (DEMO, [], "align", "prepare"),
    "demo-align-b16": (DEMO, ["student.init_from_teacher=false", "align.train.batch_size=16"], "align", "prepare"),
    "demo-distill": (DEMO, ["align.enabled=false", "student.init_from_teacher=false"], "distill", "prepare"),
    "demo-distill-b32": (DEMO, ["align.enabled=false", "student.init_from_teacher=false",
                                "distill.train.batch_size=32"], "distill", "prepare"),
    "small-cpu-cache": (SMALL, [TINY], "teacher_cache", "prepare"),
    "small-cpu-align": (SMALL, [TINY], "align", "prepare"),
    "small-cpu-align-b4": (SMALL, [TINY, "align.train.batch_size=4"], "align", "prepare"),
    "small-cpu-distill": (SMALL, [TINY, "align.enabled=false"], "distill", "prepare,teacher_cache"),
    "small-cpu-distill-online": (SMALL, [TINY, "align.enabled=false", "teacher_cache.enabled=false"], "distill",
                                 "prepare"),
    "study-a-distill": (STUDY + "a_ann_ce.yaml", [FEW], "distill", "prepare"),
    "study-b-distill": (STUDY + "b_snn_ce.yaml", [FEW], "distill", "prepare"),
    "study-c-distill-online": (STUDY + "c_snn_kd.yaml", [FEW, "teacher_cache.enabled=false"], "distill", "prepare"),
    "study-d-align": (STUDY + "d_snn_spad.yaml", [FEW], "align", "prepare"),
    "study-e-distill": (STUDY + "e_inherit_ce.yaml", [FEW], "distill", "prepare"),
}
PEAK = ("import sys\nfrom pipeline.cli import main\ncode = main(sys.argv[1:])\n"
        "print(next(l for l in open('/proc/self/status') if l.startswith('VmHWM')), file=sys.stderr)\n"
        "sys.exit(code)\n")


def _short(stage: str, steps: int) -> list[str]:
    if stage == "teacher_cache":
        return []
    t = f"{stage}.train"
    return [f"{t}.steps={steps}", f"{t}.eval_every={steps}", f"{t}.checkpoint_every={steps}", f"{t}.eval_batches=1",
            f"{t}.log_every=1"]


def measure(recipe: str, overrides: list[str], stage: str, before: str, run_dir: Path) -> float:
    """Peak RSS in bytes of one `spikedistill run --stages STAGE` process."""
    env = {**os.environ, "SPIKEDISTILL_MEMORY_AVAILABLE": "1T"}  # measure even what the check would refuse
    base = ["run", recipe, *overrides, "--run-dir", str(run_dir)]
    subprocess.run([sys.executable, "-m", "pipeline", *base, "--stages", before], check=True, env=env,
                   capture_output=True)
    proc = subprocess.run([sys.executable, "-c", PEAK, *base, "--stages", stage], env=env, capture_output=True,
                          text=True, check=False)
    found = re.search(r"VmHWM:\s+(\d+) kB", proc.stderr)
    if proc.returncode != 0 or not found:
        raise SystemExit(f"{stage} failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
    return int(found.group(1)) * 1024


def estimate(recipe: str, overrides: list[str], stage: str):
    from pipeline.memory import estimate_stage
    from pipeline.recipe import load_recipe
    from teachers import describe_teacher

    r = load_recipe(recipe, overrides)
    return estimate_stage(r, stage, describe_teacher(r.teacher.spec, trust_remote_code=r.teacher.trust_remote_code))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, from {', '.join(CASES)}")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", help="run directories (default: a temporary folder)")
    args = ap.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="bench-memory-"))
    print(f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; runs under {out}")
    print("| case | stage | batch x seq_len | estimated | measured VmHWM | estimated / measured | largest parts |")
    print("|---|---|---|---:|---:|---:|---|")
    for name in args.cases.split(","):
        recipe, overrides, stage, before = CASES[name]
        overrides = [*overrides, *_short(stage, args.steps)]
        est = estimate(recipe, overrides, stage)
        peak = measure(recipe, overrides, stage, before, out / name)
        parts = ", ".join(f"{k} {v / 1e9:.2f}" for k, v in sorted(est.parts().items(), key=lambda kv: -kv[1])[:3])
        parts += f"; set-up {est.setup / 1e9:.2f}" if est.setup else ""
        seq = re.search(r"data.seq_len=(\d+)", " ".join(overrides))
        print(f"| {name} | {stage} | {est.batch} x {seq.group(1) if seq else 'recipe'} | {est.total() / 1e9:.2f} GB | "
              f"{peak / 1e9:.2f} GB | {est.total() / peak:.2f} | {parts} |", flush=True)


if __name__ == "__main__":
    main()
