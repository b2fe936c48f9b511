"""Slowdown under one competing busy process: each workload timed alone and beside one busy loop, paired.

Workloads (demo shapes: the bundled SmolLM2-135M teacher, fp32; the 4 x 128 srwkv student, vocab 49,152):
  teacher   the teacher's forward on 4 x 128 tokens
  online    a distill step with the online teacher: teacher forward + student forward/backward + KD/CE loss
  cached    a distill step from cached top-64 targets: student forward/backward + KD/CE loss
  bpb       streaming bits/byte: 1024 tokens of Persuasion through the student in chunks of 512
Each workload runs in a fresh subprocess per thread setting, so the OpenMP pool starts with that setting. In it
the runs alternate: alone, then with one busy process (a `while True: pass` Python loop, pinned with
`taskset` to the last CPU this process may use, started before and killed after each timed run), repeated;
the figure is the median of the per-pair ratios busy / alone, next to the median times. The machine may hold
other jobs too: the pairs make their load hit both sides alike, and the load average is printed.

    .venv/bin/python -m bench.contention [--workloads teacher,online,cached,bpb] [--threads default,2,1]
                                         [--pairs 5] [--unpinned]

A thread setting is what the process is started with: `default` = no OMP_NUM_THREADS, so the CLI's policy
(students.ops.threads.configure_threads: the allowed cores, adapted to other processes' load); a number =
OMP_NUM_THREADS set to it (fixed, as before this policy: torch's default was the 2 allowed cores).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

WORKLOADS = ("teacher", "online", "cached", "bpb")


def _build(name: str):
    """A zero-argument callable running one unit of `name` (models built and warmed once)."""
    import torch

    from students import SpikeGPTConfig, SpikeGPTForCausalLM

    torch.manual_seed(0)
    student = SpikeGPTForCausalLM(SpikeGPTConfig.from_preset("demo", vocab_size=49152))
    ids = torch.randint(0, 49152, (4, 128), generator=torch.Generator().manual_seed(0))
    if name == "bpb":
        from eval.bpb import read_eval_text
        from eval.scoring import stream_logprobs
        from teachers import load_teacher

        tokens = load_teacher("smollm2-135m").tokenizer.encode(read_eval_text("persuasion")[:8000])[:1025]
        student.eval()
        return lambda: stream_logprobs(student, tokens, chunk_size=512)
    from pipeline.losses import DistillObjective

    kd = {"kind": "forward_kl", "temperature": 2.0, "chunk_size": 512}
    weights = {"sta": 0.3, "hta": 0.3}
    if name == "cached":
        from teachers.cache import SparseTargets

        gen = torch.Generator().manual_seed(1)
        top = torch.randn(4, 128, 49152, generator=gen).topk(64, -1)
        logp = top.values.log_softmax(-1) - 0.1
        targets = SparseTargets(top.indices, logp, (1 - logp.exp().sum(-1)).clamp(0, 1))
        objective = DistillObjective(student, weights, kd=kd)
        return lambda: objective(ids, targets)["loss"].backward()
    from students.ops.threads import watch
    from teachers import load_teacher

    teacher = load_teacher("smollm2-135m", dtype="fp32")
    watch(teacher.model)  # as pipeline/stages/align.py does
    if name == "teacher":
        def forward():
            with torch.no_grad():
                teacher(ids)
        return forward
    objective = DistillObjective(student, weights, teacher=teacher, kd=kd)
    return lambda: objective(ids)["loss"].backward()


def _busy(cpu: int | None) -> subprocess.Popen:
    cmd = [sys.executable, "-c", "while True: pass"]
    if cpu is not None:
        cmd = ["taskset", "-c", str(cpu), *cmd]
    proc = subprocess.Popen(cmd)
    time.sleep(0.3)  # let it start spinning
    return proc


def worker(name: str, pairs: int, pinned: bool) -> dict:
    """Runs in the subprocess: warm up, then `pairs` x (alone, busy) timed runs."""
    import torch

    from students.ops.threads import configure_threads

    if "OMP_NUM_THREADS" not in os.environ:
        configure_threads()  # what the CLI does
    run = _build(name)
    run()
    run()
    cpu = max(os.sched_getaffinity(0)) if pinned else None
    alone, busy = [], []
    for _ in range(pairs):
        start = time.perf_counter()
        run()
        alone.append(time.perf_counter() - start)
        proc = _busy(cpu)
        try:
            start = time.perf_counter()
            run()
            busy.append(time.perf_counter() - start)
        finally:
            proc.kill()
            proc.wait()
    return {"threads": torch.get_num_threads(), "alone": alone, "busy": busy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default=",".join(WORKLOADS))
    parser.add_argument("--threads", default="default,2,1", help="settings: default and/or OMP_NUM_THREADS values")
    parser.add_argument("--pairs", type=int, default=5)
    parser.add_argument("--unpinned", action="store_true", help="let the scheduler place the busy loop")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.pairs, not args.unpinned)))
        return
    print(f"{os.cpu_count()} CPUs, affinity {sorted(os.sched_getaffinity(0))}, load average "
          f"{os.getloadavg()[0]:.1f} at start; busy loop {'unpinned' if args.unpinned else 'pinned to the last CPU'}; "
          f"median of {args.pairs} pairs")
    print("| workload | threads setting | torch threads | alone s | busy s | slowdown (median of pair ratios) |")
    print("|---|---|---:|---:|---:|---:|")
    for name in args.workloads.split(","):
        for setting in args.threads.split(","):
            env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
            if setting != "default":
                env["OMP_NUM_THREADS"] = setting
            cmd = [sys.executable, "-m", "bench.contention", "--worker", name, "--pairs", str(args.pairs)]
            if args.unpinned:
                cmd.append("--unpinned")
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
            r = json.loads(out.strip().splitlines()[-1])
            ratio = statistics.median(b / a for a, b in zip(r["alone"], r["busy"]))
            print(f"| {name} | {setting} | {r['threads']} | {statistics.median(r['alone']):.3f} "
                  f"| {statistics.median(r['busy']):.3f} | {ratio:.2f}x |", flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
