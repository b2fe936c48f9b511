"""Training step of the spiking student against an HF Llama of equal size, side by side in one process.

    .venv/bin/python -m bench.train_step [--threads 1,2] [--pairs 5] [--profile] [--sweep-rate] [--rows ...]

Models: random-init fp32 SpikeGPT student (srwkv, spike-driven, T = 1) and HF LlamaForCausalLM, both vocab
49,152, width 256, 4 layers, FFN 1024, 4 heads, in training mode. The same batch (4 x 512 random token ids,
seed 0) and the same loss for every row: mean next-token cross-entropy over the 4 x 511 predicted positions
(labels = input ids, shifted inside, last position ignored). One step = zero_grad + forward + loss + backward;
no optimizer step for any model. Rows:
  student (HF-style)    model(ids, labels=ids): in training mode the model's loss goes through the fused head + CE
                        (students.ops.linear_cross_entropy; spike-aware head matmuls when head_input is binary)
                        and returns no logits; what transformers' Trainer and most users run
  student (train path)  model(ids, skip_logits=True), then the same linear_cross_entropy on head_input, called
                        by hand (how the pipeline's distill stage calls its fused loss)
  student (logits)      model(ids, labels=ids, skip_logits=False): full logits + F.cross_entropy (the
                        HF-style path before the fused one)
  Llama (HF path)       model(ids, labels=ids): HF's own loss, what a user of transformers trains with
  Llama + fused CE      model.model(ids) then the same linear_cross_entropy (dense: its input is not binary)
Steps are paired: each pair times every row once (order rotated per pair); the ratio is the median over pairs
of Llama (HF path) seconds / row seconds, so > 1 means faster than Llama. Wall-clock and process CPU time are
both given (CPU time is steadier on a shared machine). Then per model a split into body (forward + backward of
the blocks, a fixed gradient into the head input) and head + loss (forward + backward on a fixed head input),
and with --profile torch.profiler's top ops of one step per model. --sweep-rate times the head + CE at head
input firing rates 0.05-0.5, spike-aware vs dense, to place students/ops/linear_ce/cpu.py:SPARSE_MAX_RATE.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time
from contextlib import contextmanager

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from bench.machine import describe_cpu
from students import SpikeGPTConfig, SpikeGPTForCausalLM
from students.ops import linear_cross_entropy

VOCAB, WIDTH, LAYERS, FFN, HEADS = 49152, 256, 4, 1024, 4
BATCH, LENGTH = 4, 512
ROWS = ("student (HF-style)", "student (train path)", "student (logits)", "Llama (HF path)", "Llama + fused CE")


def student() -> SpikeGPTForCausalLM:
    cfg = SpikeGPTConfig(vocab_size=VOCAB, n_layer=LAYERS, d_model=WIDTH, n_head=HEADS, ffn_mult=FFN // WIDTH,
                         token_mixer="srwkv", spike_driven=True, time_steps=1)  # fmt: skip
    return SpikeGPTForCausalLM(cfg)


def llama() -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS, intermediate_size=FFN,
                      num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=4096)  # fmt: skip
    return LlamaForCausalLM(cfg)


def next_token_targets(ids: torch.Tensor) -> torch.Tensor:
    """[B, L] ids -> [B*L] targets: position t predicts ids[t+1]; the last position of each row is -100."""
    return torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100).reshape(-1)


def student_train_loss(model: SpikeGPTForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    h = model(ids, skip_logits=True).head_input
    return linear_cross_entropy(h.reshape(-1, h.shape[-1]), model.lm_head.weight, next_token_targets(ids))


def hf_loss(model, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, labels=ids).loss


def student_logits_loss(model: SpikeGPTForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    return model(ids, labels=ids, skip_logits=False).loss


def llama_fused_loss(model: LlamaForCausalLM, ids: torch.Tensor) -> torch.Tensor:
    h = model.model(ids).last_hidden_state
    return linear_cross_entropy(h.reshape(-1, h.shape[-1]), model.lm_head.weight, next_token_targets(ids))


def step(model, loss_fn, ids) -> float:
    model.zero_grad(set_to_none=True)
    loss = loss_fn(model, ids)
    loss.backward()
    return float(loss.detach())


def timed(fn) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of fn()."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def paired_steps(rows: dict, ids: torch.Tensor, pairs: int, warmup: int = 2) -> dict:
    """rows: name -> (model, loss_fn). Returns name -> list of (wall, cpu) per pair, order rotated per pair."""
    names = list(rows)
    for _ in range(warmup):
        for name in names:
            step(*rows[name], ids)
    out = {name: [] for name in names}
    for p in range(pairs):
        for name in names[p % len(names):] + names[: p % len(names)]:
            out[name].append(timed(lambda n=name: step(*rows[n], ids)))
    return out


def body_and_head(model, ids: torch.Tensor, repeats: int) -> dict:
    """Median (wall, cpu) seconds over `repeats` of the body fwd+bwd and of the head + loss fwd+bwd, measured apart."""
    is_student = isinstance(model, SpikeGPTForCausalLM)
    gen = torch.Generator().manual_seed(1)
    grad_h = torch.randn(BATCH, LENGTH, WIDTH, generator=gen) * 1e-3

    def body():
        model.zero_grad(set_to_none=True)
        h = model(ids, skip_logits=True).head_input if is_student else model.model(ids).last_hidden_state
        h.backward(grad_h)

    head_input = torch.randn(BATCH * LENGTH, WIDTH, generator=gen)
    if is_student:  # the student's head reads binary spikes: use its own last head input
        head_input = model(ids, skip_logits=True).head_input.detach().reshape(-1, WIDTH)
    head_input.requires_grad_()
    targets = next_token_targets(ids)

    def head(fused: bool):
        def run():
            model.zero_grad(set_to_none=True)
            head_input.grad = None
            if fused:
                loss = linear_cross_entropy(head_input, model.lm_head.weight, targets)
            else:
                logits = model.lm_head(head_input)
                loss = torch.nn.functional.cross_entropy(logits.float(), targets, ignore_index=-100)
            loss.backward()

        return run

    parts = {"body": body, "head + CE (HF path)": head(False), "head + CE (fused)": head(True)}
    for fn in parts.values():
        fn()
    result = {}
    for name, fn in parts.items():
        runs = [timed(fn) for _ in range(repeats)]
        result[name] = tuple(statistics.median(r[i] for r in runs) for i in range(2))
    return result


@contextmanager
def env(name: str, value: str):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def sweep_rate(repeats: int) -> None:
    """Head + CE fwd+bwd at the bench shape for binary inputs of several firing rates: spike-aware
    (SPIKEDISTILL_SPARSE=on) vs dense (=off), median process CPU seconds."""
    gen = torch.Generator().manual_seed(2)
    weight = (torch.randn(VOCAB, WIDTH, generator=gen) * WIDTH**-0.5).requires_grad_()
    targets = torch.randint(0, VOCAB, (BATCH * LENGTH,), generator=gen)
    print("| head input rate | spike-aware s (cpu) | dense s (cpu) | dense / spike-aware |")
    print("|---|---|---|---|")
    for rate in (0.05, 0.1, 0.2, 0.3, 0.4, 0.5):
        x = (torch.rand(BATCH * LENGTH, WIDTH, generator=gen) < rate).float().requires_grad_()
        times = {}
        for mode in ("on", "off"):
            with env("SPIKEDISTILL_SPARSE", mode):
                run = _head_step(x, weight, targets)
                run()
                times[mode] = statistics.median(timed(run)[1] for _ in range(repeats))
        print(f"| {rate:.2f} | {times['on']:.3f} | {times['off']:.3f} | {times['off'] / times['on']:.2f}x |")


def _head_step(x, weight, targets):
    def run():
        weight.grad = x.grad = None
        linear_cross_entropy(x, weight, targets).backward()

    return run


def profile_table(model, loss_fn, ids, rows: int = 15) -> str:
    from torch.profiler import ProfilerActivity, profile

    step(model, loss_fn, ids)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step(model, loss_fn, ids)
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", default="1,2", help="comma-separated intra-op thread counts")
    parser.add_argument("--pairs", type=int, default=5, help="paired steps per thread count (>= 5)")
    parser.add_argument("--profile", action="store_true", help="print torch.profiler's top ops per model")
    parser.add_argument("--sweep-rate", action="store_true", help="head + CE time against the head input rate")
    parser.add_argument("--rows", default=",".join(ROWS),
                        help=f"comma-separated rows to time (Llama (HF path), the baseline, always runs): {ROWS}")
    parser.add_argument("--skip-split", action="store_true", help="skip the body / head split")
    args = parser.parse_args()
    torch.manual_seed(0)
    spiking, hf = student().train(), llama().train()
    ids = torch.randint(0, VOCAB, (BATCH, LENGTH), generator=torch.Generator().manual_seed(0))
    every = {
        "student (HF-style)": (spiking, hf_loss),
        "student (train path)": (spiking, student_train_loss),
        "student (logits)": (spiking, student_logits_loss),
        "Llama (HF path)": (hf, hf_loss),
        "Llama + fused CE": (hf, llama_fused_loss),
    }
    wanted = {name.strip() for name in args.rows.split(",")} | {"Llama (HF path)"}
    unknown = wanted - set(every)
    if unknown:
        parser.error(f"--rows: unknown {sorted(unknown)}; choose among {ROWS}")
    rows = {name: row for name, row in every.items() if name in wanted}
    losses = {name: step(model, fn, ids) for name, (model, fn) in rows.items()}
    rate = spiking.spike_rates()["head_neuron"]
    print(describe_cpu())
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; fp32; vocab {VOCAB}, width {WIDTH}, {LAYERS} layers, "
          f"FFN {FFN}; batch {BATCH} x {LENGTH}; loss: mean next-token CE over {BATCH} x {LENGTH - 1} positions; "
          "step = zero_grad + forward + loss + backward, no optimizer step for any model")
    print("losses: " + ", ".join(f"{n} {v:.5f}" for n, v in losses.items()) +
          f"; student head input firing rate {rate:.3f}")  # fmt: skip
    tokens = BATCH * LENGTH
    for n_threads in [int(t) for t in args.threads.split(",")]:
        torch.set_num_threads(n_threads)
        load = os.getloadavg()[0]
        times = paired_steps(rows, ids, args.pairs)
        base = times["Llama (HF path)"]
        print(f"\n## {n_threads} thread(s), {args.pairs} paired steps (medians); load average {load:.1f} at the "
              f"start, {os.getloadavg()[0]:.1f} at the end")
        print("| row | wall s/step | tokens/s | vs Llama (HF), wall | CPU s/step | vs Llama (HF), CPU |")
        print("|---|---|---|---|---|---|")
        for name, runs in times.items():
            wall = statistics.median(r[0] for r in runs)
            cpu = statistics.median(r[1] for r in runs)
            ratio_wall = statistics.median(b[0] / r[0] for b, r in zip(base, runs))
            ratio_cpu = statistics.median(b[1] / r[1] for b, r in zip(base, runs))
            lo, hi = min(b[0] / r[0] for b, r in zip(base, runs)), max(b[0] / r[0] for b, r in zip(base, runs))
            print(f"| {name} | {wall:.3f} | {tokens / wall:.0f} | {ratio_wall:.2f}x ({lo:.2f}-{hi:.2f}) | {cpu:.3f} "
                  f"| {ratio_cpu:.2f}x |")  # fmt: skip
        if not args.skip_split:
            print("\n| model | part | wall s | CPU s |")
            print("|---|---|---|---|")
            for label, model in (("student", spiking), ("Llama", hf)):
                for part, (wall, cpu) in body_and_head(model, ids, 3).items():
                    print(f"| {label} | {part} | {wall:.3f} | {cpu:.3f} |")
        if args.profile:
            for name in ("student (HF-style)", "Llama (HF path)"):
                print(f"\n### torch.profiler, one step of {name}, {n_threads} thread(s)")
                print(profile_table(*every[name], ids))
        if args.sweep_rate:
            print(f"\n### head + CE fwd+bwd against the head input firing rate, {n_threads} thread(s)")
            sweep_rate(args.pairs)


if __name__ == "__main__":
    main()
