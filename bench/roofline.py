"""Distance to the limit: this machine's fp32 GEMM peak and FMA peak against the GFLOP/s a training step of
the study student achieves, per student vocabulary, and the bytes of text it trains on per second.

    .venv/bin/python -m bench.roofline [--threads 1,2] [--repeats 5] [--gemm-size 2048] [--vocabs teacher,...]

In one run, per thread count:
- GEMM peak: torch.matmul of two fp32 [n, n] matrices (n = --gemm-size), 2 n^3 flops, median of --repeats
  after two warm-ups; and the theoretical FMA peak from the CPU's flags and clock (bench/machine.py states the
  assumption: two FMA units per core).
- Training step of the study student (demo preset: 4 layers x 128, srwkv, T = 1, spike-driven; random init) at
  each student vocabulary (`student.vocab`: teacher = the bundled SmolLM2's 49,152, subset:N, bytes; the
  tokenizers of teachers.vocab), batch 8 x 128 = the first 1,024 tokens of the bundled held-out Persuasion
  text under that tokenizer. Step = zero_grad + `model(ids, labels=ids).loss.backward()` in training mode,
  i.e. the fused LM head + cross-entropy (spike-aware head matmuls when the head input's rate allows);
  no optimizer step. Median wall and process CPU seconds of --repeats steps after two warm-ups.
- FLOPs: counted from the real graph by torch.utils.flop_counter.FlopCounterMode over one forward + backward
  with SPIKEDISTILL_KERNELS=reference, where every matmul is an aten op the counter sees (the fast path's C
  kernels are invisible to it). These are the model's dense FLOPs, the MFU convention; the spike-aware head
  skips the zeros of its binary input in two of its three matmuls, so "executed" subtracts
  2 x (1 - rate) x 2 N C V for it. GFLOP/s (wall) = model FLOPs / median wall seconds; per core = executed
  FLOPs / median process CPU seconds, compared with the GEMM's FLOPs per CPU second at the same thread count
  and with one core's FMA peak. On a shared machine CPU time is the steadier figure (a descheduled step
  counts wall time but no CPU time).
- Bytes of text per second: tokens/s x UTF-8 bytes per token of the whole Persuasion text under that
  tokenizer, the figure that compares across vocabularies.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from contextlib import contextmanager

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench.machine import cpu, describe_cpu

VOCABS = ("teacher", "subset:16384", "subset:8192", "subset:4096", "subset:2048", "bytes")
TEACHER = "smollm2-135m"
BATCH, LENGTH = 8, 128


def median_seconds(fn, repeats: int, warmup: int = 2) -> tuple[float, float]:
    """(median wall seconds, median process CPU seconds) of fn() over `repeats` calls after `warmup`."""
    for _ in range(warmup):
        fn()
    wall, cpu_s = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu_s.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu_s)


def gemm_gflops(size: int, repeats: int) -> tuple[float, float]:
    """fp32 GFLOP/s of torch.matmul at [size, size] x [size, size] (2 size^3 flops), median of repeats: (per wall
    second, per CPU second of the process, i.e. per busy core)."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=gen), torch.randn(size, size, generator=gen)
    out = torch.empty(size, size)
    wall, cpu_s = median_seconds(lambda: torch.matmul(a, b, out=out), repeats)
    return 2 * size**3 / wall * 1e-9, 2 * size**3 / cpu_s * 1e-9


@contextmanager
def reference_kernels():
    old = os.environ.get("SPIKEDISTILL_KERNELS")
    os.environ["SPIKEDISTILL_KERNELS"] = "reference"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("SPIKEDISTILL_KERNELS")
        else:
            os.environ["SPIKEDISTILL_KERNELS"] = old


def persuasion() -> str:
    from teachers.data import bundled_corpus, read_text

    return read_text(bundled_corpus()["persuasion"])


def tokenizers(specs: list[str]) -> dict[str, object]:
    """{spec: the student's tokenizer} derived from the bundled teacher's (teachers.vocab, cached)."""
    from teachers.loading import load_tokenizer
    from teachers.vocab import student_tokenizer

    teacher = load_tokenizer(TEACHER)
    return {spec: student_tokenizer(teacher, spec) for spec in specs}


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids


def study_student(vocab_size: int):
    from students import SpikeGPTConfig, SpikeGPTForCausalLM

    torch.manual_seed(0)
    cfg = SpikeGPTConfig.from_preset("demo", vocab_size=vocab_size, token_mixer="srwkv", time_steps=1,
                                     spike_driven=True)  # fmt: skip
    return SpikeGPTForCausalLM(cfg).train()


def step_fn(model, ids: torch.Tensor):
    def step():
        model.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()

    return step


def counted_flops(model, ids: torch.Tensor) -> int:
    """FLOPs of one forward + backward, counted on the reference kernels (every matmul an aten op)."""
    with reference_kernels(), FlopCounterMode(display=False) as counter:
        step_fn(model, ids)()
    return counter.get_total_flops()


def head_saving(model, ids: torch.Tensor) -> tuple[float, int]:
    """(head input firing rate, FLOPs the spike-aware head skips: 2 (1 - rate) 2 N C V, or 0 when it is dense)."""
    from students.ops.linear_ce.cpu import uses_sparse

    with torch.no_grad():
        h = model(ids, skip_logits=True).head_input.reshape(-1, model.config.d_model)
    rate = float(h.mean())
    rows, width, vocab = h.shape[0], h.shape[1], model.config.vocab_size
    return rate, (int(2 * (1 - rate) * 2 * rows * width * vocab) if uses_sparse(h) else 0)


def measure_vocab(spec: str, tokenizer, text: str, repeats: int) -> dict:
    ids_all = encode(tokenizer, text)
    bytes_per_token = len(text.encode("utf-8")) / len(ids_all)
    ids = torch.tensor(ids_all[: BATCH * LENGTH]).view(BATCH, LENGTH)
    model = study_student(len(tokenizer))
    flops = counted_flops(model, ids)
    rate, skipped = head_saving(model, ids)
    wall, cpu_s = median_seconds(step_fn(model, ids), repeats)
    tokens_per_s = BATCH * LENGTH / wall
    return {"vocab": spec, "size": len(tokenizer), "params": sum(p.numel() for p in model.parameters()),
            "gflop": flops * 1e-9, "executed_gflop": (flops - skipped) * 1e-9, "head_rate": rate,
            "wall": wall, "cpu": cpu_s, "tokens_per_s": tokens_per_s, "bytes_per_token": bytes_per_token,
            "bytes_per_s": tokens_per_s * bytes_per_token}  # fmt: skip


def print_table(rows: list[dict], gemm_core: float, fma_core: float | None) -> None:
    """One row per vocabulary. "per core" divides by process CPU seconds (the time the step's threads ran; with
    one thread, the wall time of an idle machine) and is compared with the GEMM's GFLOP/s per CPU second at the
    same thread count and with one core's FMA peak; "wall" divides by wall seconds."""
    print("| student.vocab | V | params | GFLOP/step, model / executed | wall s | CPU s | tokens/s, wall / per core "
          "| bytes/token | kB of text/s, wall / per core | GFLOP/s per core, model / executed "
          "| executed, of GEMM / of FMA peak | head rate |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        tokens, executed = BATCH * LENGTH, r["executed_gflop"] / r["cpu"]
        of_fma = f"{executed / fma_core:.0%}" if fma_core else "n/a"
        print(f"| {r['vocab']} | {r['size']:,} | {r['params'] / 1e6:.2f}M | {r['gflop']:.2f} / "
              f"{r['executed_gflop']:.2f} | {r['wall']:.3f} | {r['cpu']:.3f} | {tokens / r['wall']:,.0f} / "
              f"{tokens / r['cpu']:,.0f} | {r['bytes_per_token']:.2f} | {r['bytes_per_s'] / 1e3:.1f} / "
              f"{tokens / r['cpu'] * r['bytes_per_token'] / 1e3:.1f} | {r['gflop'] / r['cpu']:.1f} / {executed:.1f} "
              f"| {executed / gemm_core:.0%} / {of_fma} | {r['head_rate']:.3f} |")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated intra-op thread counts")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement (median)")
    parser.add_argument("--gemm-size", type=int, default=2048, help="n of the square fp32 GEMM")
    parser.add_argument("--vocabs", default=",".join(VOCABS), help="comma-separated student.vocab spellings")
    args = parser.parse_args()
    specs = [v.strip() for v in args.vocabs.split(",")]
    machine = cpu()
    mhz, source = machine.clock_mhz
    print(describe_cpu(machine))
    print(f"torch {torch.__version__}; FMA peak assumption: 2 FMA units x {machine.fma_lanes} fp32 lanes x 2 flops "
          f"= {machine.flops_per_cycle} flops per cycle per core, at {mhz:.0f} MHz ({source})")  # fmt: skip
    text, toks = persuasion(), tokenizers(specs)
    print(f"study student: demo preset (4 x 128, srwkv, T = 1, spike-driven), batch {BATCH} x {LENGTH} of "
          f"Persuasion ({len(text.encode('utf-8')):,} bytes), step = forward + backward through model(ids, "
          "labels=ids) in training mode (fused head + CE), no optimizer step")
    for n_threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(n_threads)
        load = os.getloadavg()[0]
        gemm_wall, gemm_core = gemm_gflops(args.gemm_size, args.repeats)
        fma = machine.fma_peak_gflops(1)
        rows = [measure_vocab(spec, toks[spec], text, args.repeats) for spec in specs]
        fma_text = "unknown"
        if fma:
            fma_text = (f"{fma:.1f} GFLOP/s per core ({fma * n_threads:.1f} for {n_threads}); the GEMM's rate per "
                        f"core is that peak at {gemm_core / machine.flops_per_cycle:.2f} GHz")  # fmt: skip
        print(f"\n## {n_threads} thread(s): fp32 GEMM {args.gemm_size}^3 measured {gemm_wall:.1f} GFLOP/s (wall), "
              f"{gemm_core:.1f} per core (CPU time); theoretical FMA peak {fma_text}; load average {load:.1f} at "
              f"the start, {os.getloadavg()[0]:.1f} at the end")  # fmt: skip
        print_table(rows, gemm_core, fma)


if __name__ == "__main__":
    main()
