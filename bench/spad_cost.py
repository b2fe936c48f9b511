"""Seconds per distill step of joint SpAD (g_snn_spad_joint) against plain cached KD (c_snn_kd), in one process.

    .venv/bin/python -m bench.spad_cost [--steps 5] [--threads 1] [--budget 584]

The study's shapes: the demo student (4 x 128, srwkv, the teacher's 49,152-token vocabulary), the bundled
SmolLM2-135M (fp32), batch 8 x 128 random token ids, top-64 targets made from the teacher's own logits (what
the cache stores; made once, untimed). Two objectives over one student, each with its own AdamW, steps
alternated (forward, backward, optimizer step) so both see the same load on a shared machine:
  kd     STA on the cached targets + HTA (0.3 / 0.3), kd impl fused: c_snn_kd's step;
  joint  the same plus EA + SAA + SFA against the online teacher (embeddings, hidden states, attention maps of
         every layer), at 0.2 / 0.1 / 0.1: g_snn_spad_joint's step.
Prints the median wall and CPU seconds (of this process) of --steps steps each, after one warm-up step: on a
busy shared machine the CPU seconds are the steadier figure, and at one thread they approach an idle
machine's wall time. Then the joint step split into its parts (wall: teacher forward, student forward, SpAD
terms, logit terms, backward, optimizer), and both arms' training time at --budget steps from the CPU
medians (validation and start-up not included).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time
from dataclasses import asdict

import torch

from bench.kd import _Timed

RECIPES = {"kd": "recipes/study/c_snn_kd.yaml", "joint": "recipes/study/g_snn_spad_joint.yaml"}


def _objectives(threads: int):
    """(objectives {"kd", "joint"} over one student, the teacher, the timer their parts write into)."""
    from pipeline.build import build_spad, build_student
    from pipeline.losses import DistillObjective
    from pipeline.recipe import load_recipe
    from teachers import load_teacher

    torch.set_num_threads(threads)
    recipes = {arm: load_recipe(path) for arm, path in RECIPES.items()}
    joint = recipes["joint"]
    teacher = load_teacher(joint.teacher.spec, dtype="fp32", attn_maps=True)
    student = build_student(joint, teacher.vocab_size)
    timer: dict[str, float] = {}
    objectives = {}
    for arm, r in recipes.items():
        weights = asdict(r.distill.weights)
        spad = build_spad(r, student, teacher, weights, logging.getLogger("bench.spad_cost"))
        kd = {"kind": r.distill.kd.kind, "temperature": r.distill.kd.temperature, "chunk_size": r.distill.kd.chunk_size,
              "beta": r.distill.kd.jsd_beta, "impl": r.distill.kd.impl}
        objectives[arm] = DistillObjective(student, weights, teacher=_Timed(teacher, timer, "teacher") if spad else None,
                                           spad=spad, kd=kd)
    spad = objectives["joint"].spad
    spad.forward = _Timed(spad.forward, timer, "spad terms")
    objectives["joint"]._student_forward = _Timed(objectives["joint"]._student_forward, timer, "student forward")
    objectives["joint"]._logit_terms = _Timed(objectives["joint"]._logit_terms, timer, "logit terms")
    return objectives, teacher, timer


def _targets(teacher, ids: torch.Tensor, k: int = 64):
    """Top-k teacher log-probabilities of ids [B, L], stored like the cache: SparseTargets [B, L, k]."""
    from teachers.cache import SparseTargets

    with torch.no_grad():
        logprobs = teacher(ids, hidden_states=False).logits.float().log_softmax(-1)
    top = logprobs.topk(k, -1)
    return SparseTargets(top.indices, top.values.bfloat16().float(), (1 - top.values.exp().sum(-1)).clamp(0, 1))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5, help="timed steps per arm (after one warm-up step each)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--budget", type=int, default=584, help="distill steps of a study run, for the estimate")
    args = p.parse_args(argv)
    objectives, teacher, timer = _objectives(args.threads)
    ids = torch.randint(0, teacher.vocab_size, (8, 128), generator=torch.Generator().manual_seed(0))
    targets = _targets(teacher, ids)
    optimizers = {arm: torch.optim.AdamW([p for p in o.parameters() if p.requires_grad], lr=1e-4)
                  for arm, o in objectives.items()}
    seconds: dict[str, list[tuple[float, float]]] = {"kd": [], "joint": []}
    parts: dict[str, list[float]] = {}
    for step in range(args.steps + 1):
        for arm in (("kd", "joint") if step % 2 else ("joint", "kd")):
            timer.clear()
            start, cpu = time.perf_counter(), time.process_time()
            loss = objectives[arm](ids, targets=targets)["loss"] / (8 * 127)
            forward = time.perf_counter()
            loss.backward()
            backward = time.perf_counter()
            optimizers[arm].step()
            optimizers[arm].zero_grad(set_to_none=True)
            end = time.perf_counter()
            if not step:
                continue  # warm-up
            seconds[arm].append((end - start, time.process_time() - cpu))
            if arm == "joint":
                for name, value in {**timer, "backward": backward - forward, "optimizer": end - backward}.items():
                    parts.setdefault(name, []).append(value)
    med = {arm: statistics.median(s for s, _ in v) for arm, v in seconds.items()}
    cpu = {arm: statistics.median(c for _, c in v) for arm, v in seconds.items()}
    print(f"## seconds per distill step, batch 8 x 128, {args.threads} thread(s), median of {args.steps} steps")
    print("| arm | wall s/step | each step (wall) | CPU s/step | vs kd (wall) | vs kd (CPU) |")
    print("|---|---:|---|---:|---:|---:|")
    for arm in ("kd", "joint"):
        each = " ".join(f"{s:.2f}" for s, _ in seconds[arm])
        print(f"| {arm} | {med[arm]:.2f} | {each} | {cpu[arm]:.2f} | {med[arm] / med['kd']:.2f}x | "
              f"{cpu[arm] / cpu['kd']:.2f}x |")
    print("\n## the joint step by part (medians)")
    print("| part | s | fraction |")
    print("|---|---:|---:|")
    for name, values in parts.items():
        print(f"| {name} | {statistics.median(values):.2f} | {statistics.median(values) / med['joint']:.2f} |")
    print(f"\n{args.budget} steps at the CPU medians: joint arm {args.budget * cpu['joint'] / 60:.0f} min, kd arm "
          f"{args.budget * cpu['kd'] / 60:.0f} min of training steps")


if __name__ == "__main__":
    main()
