"""Cached top-k KD against CE-only training of the same student, and where an online-teacher distill step goes.

    .venv/bin/python -m bench.kd [--steps 12] [--repeats 3] [--threads 1] [--mode concurrent|sequential]
                                 [--impls fused,chunked] [--train-tokens 12384] [--inprocess-steps 5]
                                 [--online-steps 3] [--skip-runs] [--skip-inprocess] [--skip-online]
                                 [--workdir DIR]

Part 1, through the CLI: `spikedistill run` of the study's arms b_snn_ce (CE only) and c_snn_kd (STA on the
cached top-64 targets + HTA; tau 2) at the study's shapes (4 x 128 `demo` student, the bundled SmolLM2-135M's
49,152-token vocabulary, batch 8 x 128), each for --steps distill steps, stages prepare, teacher_cache and
distill only (the shared teacher cache is built once, untimed). Per repeat one CE run and one KD run, by
default at the same time (--mode concurrent, --threads each): on a machine shared with other jobs both runs
then see the same load, which one-after-the-other runs do not. Figures per run: the trainer's tokens/s
(done.json) and the median step's tokens/s (metrics.jsonl, step 1 left out); the ratio KD / CE per repeat
and its median over repeats, per distill.kd.impl.

Part 2, in process: the same comparison without the CLI around it: objective steps (forward, backward, AdamW)
of CE only, of cached top-64 KD and of KD from a hidden store (teacher_cache.store=hidden: bf16 hidden states
of SmolLM2-135M's width 576, its full logits recomputed by a [49,152 x 576] head inside the loss) rotated on one
batch, --inprocess-steps each per impl. Wall seconds, and CPU seconds of this process, which a busy shared
machine disturbs less than wall time.

Part 3, in process: --online-steps steps of the distill objective with the online teacher (STA + HTA, no
cache), the same shapes, timed per part: teacher (body forward, and its head's logits made chunk by chunk
inside the loss), student (forward + backward), loss (head + KD + CE of the student, forward and backward,
teacher head excluded) and optimizer (AdamW step). Printed as fractions of the step (medians over steps,
after one untimed warm-up step).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
ARMS = {"ce": "recipes/study/b_snn_ce.yaml", "kd": "recipes/study/c_snn_kd.yaml"}
BATCH, SEQ_LEN = 8, 128


def _launch(arm: str, impl: str, name: str, args, workdir: Path, stages: str | None = None
            ) -> tuple[subprocess.Popen, list[str]]:
    """Start one `spikedistill run` of an arm (stages prepare, [teacher_cache,] distill) in the background."""
    overrides = [
        f"run.runs_dir={workdir}", f"run.name={name}", f"teacher_cache.dir={workdir / '_teacher_cache'}",
        f"data.max_train_tokens={args.train_tokens}", f"distill.train.steps={args.steps}",
        f"distill.train.eval_every={args.steps}", "distill.train.eval_batches=1",
        f"distill.train.checkpoint_every={args.steps}", "distill.train.log_every=1", f"distill.kd.impl={impl}",
    ]
    shutil.rmtree(workdir / name, ignore_errors=True)  # a fresh run; the teacher cache folder is kept
    stages = stages or ("prepare,teacher_cache,distill" if arm == "kd" else "prepare,distill")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "pipeline", "run", ARMS[arm], *overrides, "--stages", stages]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return proc, cmd


def _figures(proc: subprocess.Popen, cmd: list[str], stage: Path) -> dict:
    """Wait for a run; its distill tokens/s: the trainer's figure and the median step's (step 1 left out)."""
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"bench/kd.py: {' '.join(cmd)} failed:\n{err[-2000:]}")
    metrics = json.loads((stage / "done.json").read_text())["metrics"]
    steps = [json.loads(line) for line in (stage / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [s for s in steps if s.get("split") == "train" and s.get("step", 0) > 1]
    return {"tokens_per_s": metrics["tokens_per_s"],
            "median_step_tokens_per_s": statistics.median(s["tokens"] / s["seconds"] for s in train)}


def _pair(impl: str, rep: int, args, workdir: Path) -> dict:
    """One CE run and one KD run: at the same time (--mode concurrent) or one after the other."""
    order = ("kd", "ce") if rep % 2 == 0 else ("ce", "kd")
    res = {}
    if args.mode == "concurrent":
        procs = {arm: _launch(arm, impl, f"{impl}_{arm}_{rep}", args, workdir) for arm in order}
        for arm, (proc, cmd) in procs.items():
            res[arm] = _figures(proc, cmd, workdir / f"{impl}_{arm}_{rep}" / "distill")
    else:
        for arm in order:
            proc, cmd = _launch(arm, impl, f"{impl}_{arm}_{rep}", args, workdir)
            res[arm] = _figures(proc, cmd, workdir / f"{impl}_{arm}_{rep}" / "distill")
    return {**res, "order": order}


def bench_runs(args) -> None:
    workdir = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench_kd_"))
    workdir.mkdir(parents=True, exist_ok=True)
    if not (workdir / "_teacher_cache" / "manifest.json").exists():  # build the shared cache once, untimed
        proc, cmd = _launch("kd", "fused", "cache-build", args, workdir, stages="prepare,teacher_cache")
        if proc.wait() != 0:
            raise SystemExit(f"bench/kd.py: {' '.join(cmd)} failed:\n{proc.stderr.read()[-2000:]}")
    how = ("both runs of a pair at the same time, so they share whatever load the machine has"
           if args.mode == "concurrent" else "the runs of a pair one after the other")
    print(f"## cached top-64 KD (c_snn_kd) vs CE only (b_snn_ce): {args.steps} distill steps per run, "
          f"batch {BATCH} x {SEQ_LEN}, {args.threads} thread(s) per run, {how}; runs in {workdir}")
    print("| impl | repeat | started | CE tok/s | KD tok/s | KD / CE | CE median-step tok/s | KD median-step tok/s "
          "| KD / CE (median step) |")
    print("|---|---|---|---|---|---|---|---|---|")
    summary = {}
    for impl in args.impls.split(","):
        ratios, step_ratios = [], []
        for rep in range(args.repeats):
            res = _pair(impl, rep, args, workdir)
            ce, kd = res["ce"], res["kd"]
            ratios.append(kd["tokens_per_s"] / ce["tokens_per_s"])
            step_ratios.append(kd["median_step_tokens_per_s"] / ce["median_step_tokens_per_s"])
            print(f"| {impl} | {rep} | {' then '.join(res['order'])} | {ce['tokens_per_s']:.0f} | "
                  f"{kd['tokens_per_s']:.0f} | {ratios[-1]:.2f}x | {ce['median_step_tokens_per_s']:.0f} | "
                  f"{kd['median_step_tokens_per_s']:.0f} | {step_ratios[-1]:.2f}x |", flush=True)
        summary[impl] = (statistics.median(ratios), statistics.median(step_ratios))
    for impl, (r, sr) in summary.items():
        print(f"impl {impl}: KD / CE tokens/s, median over repeats: {r:.2f}x (trainer figure), "
              f"{sr:.2f}x (median step)")


class _Timed:
    """Accumulates the wall time of calls to a wrapped callable into timer[key]."""

    def __init__(self, fn, timer: dict, key: str):
        self.fn, self.timer, self.key = fn, timer, key

    def __call__(self, *a, **kw):
        start = time.perf_counter()
        try:
            return self.fn(*a, **kw)
        finally:
            self.timer[self.key] = self.timer.get(self.key, 0.0) + time.perf_counter() - start

    def __getattr__(self, name):
        return getattr(self.fn, name)


def bench_online(args) -> None:
    from pipeline import losses
    from students import SpikeGPTConfig, SpikeGPTForCausalLM
    from teachers import load_teacher

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    teacher = load_teacher("smollm2-135m", dtype="fp32")
    student = SpikeGPTForCausalLM(SpikeGPTConfig.from_preset("demo", vocab_size=teacher.config.vocab_size))
    timer: dict[str, float] = {}
    teacher.head = _Timed(teacher.head, timer, "teacher_head")
    objective = losses.DistillObjective(student, {"sta": 0.3, "hta": 0.3}, teacher=_Timed(teacher, timer, "teacher"),
                                        kd={"kind": "forward_kl", "temperature": 2.0, "chunk_size": 512})
    logit_losses = losses.logit_losses
    losses.logit_losses = _Timed(logit_losses, timer, "loss")
    student_forward = student.forward
    student.forward = _Timed(student_forward, timer, "student_fwd")
    optimizer = torch.optim.AdamW(objective.parameters(), lr=1e-4)
    ids = torch.randint(0, teacher.config.vocab_size, (BATCH, SEQ_LEN + 1), generator=torch.Generator().manual_seed(0))
    parts: dict[str, list[float]] = {}
    try:
        for step in range(args.online_steps + 1):
            timer.clear()
            start = time.perf_counter()
            out = objective(ids)
            mid = time.perf_counter()
            (out["loss"] / (BATCH * SEQ_LEN)).backward()
            bwd = time.perf_counter()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            end = time.perf_counter()
            if step == 0:
                continue  # warm-up
            row = {"teacher": timer["teacher"] + timer["teacher_head"],
                   "student": timer["student_fwd"] + (bwd - mid),
                   "loss": timer["loss"] - timer["teacher_head"],
                   "optimizer": end - bwd, "total": end - start}
            row["other"] = row["total"] - sum(v for k, v in row.items() if k != "total")
            for k, v in row.items():
                parts.setdefault(k, []).append(v)
    finally:
        losses.logit_losses = logit_losses
    med = {k: statistics.median(v) for k, v in parts.items()}
    print(f"## online-teacher distill step (SmolLM2-135M fp32 teacher, demo student, batch {BATCH} x {SEQ_LEN}, "
          f"STA forward KL tau 2 + HTA, kd impl fused), {args.threads} thread(s), median of {args.online_steps} steps")
    print("| part | seconds | fraction of the step |")
    print("|---|---|---|")
    for k in ("teacher", "student", "loss", "optimizer", "other", "total"):
        print(f"| {k} | {med[k]:.3f} | {med[k] / med['total']:.2f} |")
    print("(teacher = body forward + its head's logits, chunk by chunk inside the loss; student = forward + "
          "backward; loss = the student's head + KD + CE, forward and backward)")


def bench_inprocess(args) -> None:
    """CE-only, cached top-64 KD and hidden-store KD objective steps rotated in one process: wall and CPU
    seconds."""
    from pipeline.losses import DistillObjective
    from students import SpikeGPTConfig, SpikeGPTForCausalLM
    from teachers.cache import HiddenTargets, SparseTargets, TeacherHead

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vocab = 49152
    student = SpikeGPTForCausalLM(SpikeGPTConfig.from_preset("demo", vocab_size=vocab))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (BATCH, SEQ_LEN + 1), generator=gen)
    # top-64 of a random teacher distribution, stored as the cache stores them (ids, log-probs, tail mass)
    top = (torch.randn(BATCH, SEQ_LEN + 1, vocab, generator=gen) * 3).log_softmax(-1).topk(64, -1)
    targets = {"kd": SparseTargets(top.indices, top.values.bfloat16().float(),
                                   (1 - top.values.exp().sum(-1)).clamp(0, 1)),
               "hidden": HiddenTargets(torch.randn(BATCH, SEQ_LEN + 1, 576, generator=gen).bfloat16(),
                                       TeacherHead(torch.randn(vocab, 576, generator=gen) / 24))}
    kd = {"kind": "forward_kl", "temperature": 2.0, "chunk_size": 512}
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4)
    print(f"## in process: one objective step (forward, backward, AdamW) of the demo student, batch {BATCH} x "
          f"{SEQ_LEN}: CE only, STA on top-64 targets + HTA (kd), STA from a hidden store + HTA (hidden), "
          f"rotated, {args.threads} thread(s), median of {args.inprocess_steps} steps each after one warm-up")
    print("| impl | CE wall s | kd wall s | hidden wall s | kd / CE tokens/s (wall) | hidden / CE (wall) | "
          "hidden / kd (wall) | hidden / kd (CPU) |")
    print("|---|---|---|---|---|---|---|---|")
    for impl in args.impls.split(","):
        arms = {"ce": DistillObjective(student, {"sta": 0.0, "hta": 1.0}, kd={**kd, "impl": impl}),
                "kd": DistillObjective(student, {"sta": 0.3, "hta": 0.3}, kd={**kd, "impl": impl}),
                "hidden": DistillObjective(student, {"sta": 0.3, "hta": 0.3}, kd={**kd, "impl": impl})}
        times: dict[str, list[tuple[float, float]]] = {arm: [] for arm in arms}
        for step in range(args.inprocess_steps + 1):
            order = list(arms)[step % 3:] + list(arms)[:step % 3]
            for arm in order:
                wall, cpu = time.perf_counter(), time.process_time()
                out = arms[arm](ids, targets=targets.get(arm))
                (out["loss"] / (BATCH * SEQ_LEN)).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if step:
                    times[arm].append((time.perf_counter() - wall, time.process_time() - cpu))
        med = {arm: [statistics.median(t[i] for t in v) for i in range(2)] for arm, v in times.items()}
        print(f"| {impl} | {med['ce'][0]:.2f} | {med['kd'][0]:.2f} | {med['hidden'][0]:.2f} | "
              f"{med['ce'][0] / med['kd'][0]:.2f}x | {med['ce'][0] / med['hidden'][0]:.2f}x | "
              f"{med['kd'][0] / med['hidden'][0]:.2f}x | {med['kd'][1] / med['hidden'][1]:.2f}x |", flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=12, help="distill steps per `spikedistill run`")
    p.add_argument("--repeats", type=int, default=3, help="KD/CE run pairs per impl")
    p.add_argument("--threads", type=int, default=1, help="threads per run (and for the in-process parts)")
    p.add_argument("--mode", choices=("concurrent", "sequential"), default="concurrent",
                   help="run the CE and the KD run of a pair at the same time (default) or one after the other")
    p.add_argument("--impls", default="fused,chunked", help="distill.kd.impl values to compare")
    p.add_argument("--train-tokens", type=int, default=12384,
                   help="data.max_train_tokens: the rows the teacher cache is built for (once per --workdir)")
    p.add_argument("--online-steps", type=int, default=3)
    p.add_argument("--inprocess-steps", type=int, default=5, help="steps per arm of the in-process comparison")
    p.add_argument("--skip-runs", action="store_true")
    p.add_argument("--skip-inprocess", action="store_true")
    p.add_argument("--skip-online", action="store_true")
    p.add_argument("--workdir", help="where the runs go (default: a new temporary folder)")
    args = p.parse_args(argv)
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average at start "
          f"{os.getloadavg()[0]:.1f}")
    if not args.skip_runs:
        bench_runs(args)
    if not args.skip_inprocess:
        bench_inprocess(args)
    if not args.skip_online:
        bench_online(args)


if __name__ == "__main__":
    main()
