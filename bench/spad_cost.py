"""Seconds per distill step of joint SpAD (g_snn_spad_joint), online and from the feature cache, against plain
cached KD (c_snn_kd), in one process; the feature cache's size and one-off build time.

    .venv/bin/python -m bench.spad_cost [--steps 5] [--threads 1] [--budget 584] [--build-rows 32]
                                        [--study-rows 4748]

The study's shapes: the demo student (4 x 128, srwkv, the teacher's 49,152-token vocabulary), the bundled
SmolLM2-135M (fp32), batch 8 x 128 of the bundled corpus (the first rows of Austen, prepared into a temporary
folder), top-64 targets at the recipe's tau made from the teacher's own logits (what the logit cache stores;
made once, untimed). Three objectives over one student, each with its own AdamW, steps rotated (forward,
backward, optimizer step) so all see the same load on a shared machine:
  kd            STA on the cached targets + HTA (0.3 / 0.3), kd impl fused: c_snn_kd's step;
  joint         the same plus EA + SAA + SFA against the online teacher (embeddings, hidden states, attention
                maps of every layer), at 0.2 / 0.1 / 0.1: g_snn_spad_joint's step before the feature cache;
  joint-cached  the same five terms with the SpAD targets read from the feature cache (teacher_cache.features,
                the recipe's value dtype) inside the timed step, the teacher never run: g_snn_spad_joint's step.
The feature cache is first built over --build-rows rows with the teacher_cache stage's own code (timed: the
one-off build per row, scaled to --study-rows), which gives its bytes per row; before any step, the joint
terms and the gradient of their weighted sum from that (bf16) cache are compared with the online ones.
Prints the median wall and CPU seconds (of this process) of --steps steps each, after one warm-up step, and the
load average at the start and end: on a busy shared machine the CPU seconds are the steadier figure, and at one
thread they approach an idle machine's wall time. Then the joint steps split into their parts (wall), and each
arm's training time at --budget steps from the CPU medians (validation and start-up not included).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

from bench.kd import _Timed

RECIPES = {"kd": "recipes/study/c_snn_kd.yaml", "joint": "recipes/study/g_snn_spad_joint.yaml"}
ARMS = ("kd", "joint", "joint-cached")
LOG = logging.getLogger("bench.spad_cost")


def _objectives(recipes: dict, teacher):
    """(objectives {arm: DistillObjective} over one student and one SpADLoss, the timer their parts write into)."""
    from pipeline.build import build_spad, build_student
    from pipeline.losses import DistillObjective

    joint = recipes["joint"]
    student = build_student(joint, teacher.vocab_size)
    spad = build_spad(joint, student, teacher, asdict(joint.distill.weights), LOG)
    timer: dict[str, float] = {}
    spad.forward = _Timed(spad.forward, timer, "spad terms")

    def objective(r, online, spad_loss=None):
        k = r.distill.kd
        kd = {"kind": k.kind, "temperature": k.temperature, "chunk_size": k.chunk_size, "beta": k.jsd_beta,
              "impl": k.impl}
        return DistillObjective(student, asdict(r.distill.weights), teacher=online, spad=spad_loss, kd=kd)

    objectives = {"kd": objective(recipes["kd"], None),
                  "joint": objective(joint, _Timed(teacher, timer, "teacher forward"), spad),
                  "joint-cached": objective(joint, None, spad)}
    for arm in ("joint", "joint-cached"):
        o = objectives[arm]
        o._student_forward = _Timed(o._student_forward, timer, "student forward")
        o._logit_terms = _Timed(o._logit_terms, timer, "logit terms")
    return objectives, timer


def _rows(teacher, folder: Path, rows: int):
    """The first `rows` rows of 128 tokens of the bundled Austen, prepared into `folder` -> TokenDataset."""
    from teachers.data import TokenDataset, prepare_corpus

    prepare_corpus(["bundled:austen"], teacher.tokenizer, folder, seq_len=128, val_fraction=0.0,
                   max_tokens=(rows + 1) * 128)
    ds = TokenDataset(folder, "train")
    if len(ds) < rows:
        raise SystemExit(f"only {len(ds)} rows prepared, {rows} asked")
    return ds


def _build(recipe, teacher, dataset: Path, out: Path) -> tuple[dict, float]:
    """Build the feature cache of the joint recipe (the teacher_cache stage's code) -> (stats, CPU seconds)."""
    from pipeline.stages.teacher_cache import build_features

    cpu = time.process_time()
    stats = build_features(recipe, teacher, str(dataset), out, progress=False)
    return stats, time.process_time() - cpu


def _fidelity(objectives: dict, ids, targets, features) -> list[str]:
    """Markdown rows: each joint term from the cache against online, and the cosine of their gradients."""
    out, grads = {}, {}
    for arm, batch in (("joint", {}), ("joint-cached", {"features": features})):
        o = objectives[arm]
        o.zero_grad(set_to_none=True)
        result = o(ids, targets=targets, **batch)
        result["loss"].backward()
        out[arm] = {k: float(v.detach()) for k, v in result.items()}
        grads[arm] = torch.cat([p.grad.double().flatten() for _, p in sorted(o.named_parameters())
                                if p.grad is not None])
        o.zero_grad(set_to_none=True)
    n = ids.shape[0] * (ids.shape[1] - 1)
    lines = ["| term | online / token | cached / token | relative difference |", "|---|---:|---:|---:|"]
    for term, value in out["joint"].items():
        cached = out["joint-cached"][term]
        lines.append(f"| {term} | {value / n:.6g} | {cached / n:.6g} | {cached / value - 1:+.2e} |")
    cos = float(torch.nn.functional.cosine_similarity(grads["joint"], grads["joint-cached"], dim=0))
    return lines + [f"\ngradient of the weighted loss, cached vs online: cosine {cos:.6f}"]


def _step(objective, optimizer, ids, targets, read) -> None:
    loss = objective(ids, targets=targets, **read())["loss"] / (ids.shape[0] * (ids.shape[1] - 1))
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> None:
    from pipeline.losses import SpADTargets
    from pipeline.recipe import load_recipe
    from teachers import load_teacher
    from teachers.cache import topk_targets
    from teachers.feature_cache import FeatureCache

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5, help="timed steps per arm (after one warm-up step each)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--budget", type=int, default=584, help="distill steps of a study run, for the estimate")
    p.add_argument("--build-rows", type=int, default=32, help="rows the timed feature-cache build covers")
    p.add_argument("--study-rows", type=int, default=4748, help="training rows of the study, for the estimate")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]
    recipes = {arm: load_recipe(path) for arm, path in RECIPES.items()}
    joint = recipes["joint"]
    teacher = load_teacher(joint.teacher.spec, dtype="fp32", attn_maps=True)
    objectives, timer = _objectives(recipes, teacher)
    with tempfile.TemporaryDirectory() as tmp:
        ds = _rows(teacher, Path(tmp) / "data", args.build_rows)
        stats, build_cpu = _build(joint, teacher, Path(tmp) / "data", Path(tmp) / "features")
        cache = FeatureCache(Path(tmp) / "features")
        rows = list(range(8))
        ids = torch.stack([ds[i] for i in rows])
        with torch.no_grad():
            targets = topk_targets(teacher(ids, hidden_states=False).logits, recipes["kd"].teacher_cache.k,
                                   recipes["kd"].distill.kd.temperature)
        print(f"## joint terms on the first 8 rows, {joint.teacher_cache.value_dtype} feature cache vs online teacher")
        print("\n".join(_fidelity(objectives, ids, targets, SpADTargets.from_tensors(cache.batch(rows)))))
        _report_size(cache, stats, build_cpu, args)
        optimizers = {arm: torch.optim.AdamW([q for q in o.parameters() if q.requires_grad], lr=1e-4)
                      for arm, o in objectives.items()}
        reads = {"kd": dict, "joint": dict,
                 "joint-cached": _Timed(lambda: {"features": SpADTargets.from_tensors(cache.batch(rows))}, timer,
                                        "feature read")}
        seconds, parts = _time_steps(objectives, optimizers, reads, ids, targets, timer, args.steps)
    _report_times(seconds, parts, args, load_start, os.getloadavg()[0])


def _time_steps(objectives, optimizers, reads, ids, targets, timer, steps):
    """{arm: [(wall, CPU seconds) per step]}, {arm: {part: [wall seconds]}} of `steps` steps after a warm-up."""
    seconds: dict[str, list[tuple[float, float]]] = {arm: [] for arm in ARMS}
    parts: dict[str, dict[str, list[float]]] = {arm: {} for arm in ARMS}
    for step in range(steps + 1):
        for arm in ARMS[step % 3:] + ARMS[:step % 3]:  # rotated, so no arm always follows the same one
            timer.clear()
            start, cpu = time.perf_counter(), time.process_time()
            _step(objectives[arm], optimizers[arm], ids, targets, reads[arm])
            if step:  # step 0 warms up
                seconds[arm].append((time.perf_counter() - start, time.process_time() - cpu))
                for name, value in timer.items():
                    parts[arm].setdefault(name, []).append(value)
    return seconds, parts


def _report_size(cache, stats: dict, build_cpu: float, args) -> None:
    key, rows = cache.key, stats["rows"]
    itemsize = {"bf16": 2, "fp16": 2, "fp32": 4}[key["value_dtype"]]
    print(f"\n## the feature cache ({key['value_dtype']}, terms {', '.join(key['terms'])}, layer map "
          f"{key['layer_map']}, {key['heads']} heads stored)")
    print("| tensor | per row (shape) | bytes per row | study total |")
    print("|---|---|---:|---:|")
    for name, shape in cache.shapes.items():
        size = itemsize * int(torch.tensor(shape).prod())
        print(f"| {name} | {list(shape)} | {size:,} | {size * args.study_rows / 1e9:.2f} GB |")
    print(f"| all, on disk (shard headers included) | | {stats['bytes_per_row']:,.0f} | "
          f"{stats['bytes_per_row'] * args.study_rows / 1e9:.2f} GB |")
    print(f"\nbuild: {rows} rows in {build_cpu:.1f} CPU s ({build_cpu / rows:.2f} CPU s per row); "
          f"{args.study_rows} rows: {build_cpu / rows * args.study_rows / 60:.0f} CPU min, once")


def _report_times(seconds, parts, args, load_start: float, load_end: float) -> None:
    med = {arm: statistics.median(s for s, _ in v) for arm, v in seconds.items()}
    cpu = {arm: statistics.median(c for _, c in v) for arm, v in seconds.items()}
    print(f"\n## seconds per distill step, batch 8 x 128, {args.threads} thread(s), median of {args.steps} steps "
          f"(load average {load_start:.1f} at the start, {load_end:.1f} at the end)")
    print("| arm | wall s/step | CPU s/step | each step (CPU) | vs kd (CPU) | vs joint (CPU) |")
    print("|---|---:|---:|---|---:|---:|")
    for arm in ARMS:
        each = " ".join(f"{c:.2f}" for _, c in seconds[arm])
        print(f"| {arm} | {med[arm]:.2f} | {cpu[arm]:.2f} | {each} | {cpu[arm] / cpu['kd']:.2f}x | "
              f"{cpu[arm] / cpu['joint']:.2f}x |")
    for arm in ("joint", "joint-cached"):
        print(f"\n## the {arm} step by part (wall medians)")
        print("| part | s | fraction |")
        print("|---|---:|---:|")
        for name, values in parts[arm].items():
            print(f"| {name} | {statistics.median(values):.3f} | {statistics.median(values) / med[arm]:.2f} |")
    print(f"\n{args.budget} steps at the CPU medians (training steps only): "
          + ", ".join(f"{arm} {args.budget * cpu[arm] / 60:.1f} min" for arm in ARMS))


if __name__ == "__main__":
    main()
