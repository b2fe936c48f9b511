"""Decode latency of the event-driven path: ms per generate() step at batch 1, dense vs event-driven vs HF peers.

For each student (a preset at random init, with the teacher's vocabulary or a derived one of `student.vocab`,
and/or trained model directories) and thread count: `generate()` from a prompt of real text (Persuasion, in the
student's tokenizer) with SPIKEDISTILL_SPARSE=off (dense: the module path, every Linear a dense matmul) and
the default `auto` (event-driven: the fused decode step, students/ops/decode_step), and HF RWKV-4 and Llama of
equal size (width, depth, FFN, vocabulary; random init). The time of a decode step is the time between two
consecutive calls of a logits processor (model forward plus generate's own work per token): at 1 thread also
the calling thread's CPU time, which time spent descheduled by other jobs does not inflate. The four run
interleaved, one generate() each per round; a round's figure is the median over its steps, and the table gives
medians over rounds, with event / dense as the median of the rounds' paired ratios.

Firing rates: a random-init student fires at ~0.15; `--rate R` sets every LIF's threshold (per neuron layer,
multiplicatively, until each fires at R +- 0.01 on the prompt) so that the event path sees a trained student's
spike counts (the trained demo student fires at ~0.28); the rates printed are those on the prompt and those on
the generated continuation. `--sweep` repeats the table at other rates. `--profile` splits a dense decode step
into head, body Linears, LIF ops, WKV, LayerNorm, other torch ops and Python/dispatch (torch.profiler), and a
fused one into its C call (body and head) and Python. `--kernels` adds one Linear's dense vs gather-add sweep.

    .venv/bin/python -m bench.decode [--preset demo] [--vocab teacher,subset:4096,subset:8192,bytes] [--rate 0.28]
        [--model DIR] [--threads 1,2] [--context 256] [--new-tokens 64] [--rounds 5] [--sweep 0.1,0.45]
        [--profile] [--kernels | --kernels-only]
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import statistics
import time
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    LogitsProcessor,
    LogitsProcessorList,
    RwkvConfig,
    RwkvForCausalLM,
)

import students  # noqa: F401  (registers spikegpt)
from students import SpikeGPTConfig, SpikeGPTForCausalLM, cache_kwargs, state_of
from students.layers import LIF, SpikeLinear
from students.ops.csrc import library
from students.ops.event_linear import calibrate, event_linear_reference
from students.ops.event_linear.cpu import event_linear_cpu

VOCAB = 49152


def cpu_name() -> str:
    """lscpu's model name and whether the CPU has AVX2 / AVX-512F."""
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    lines = info.splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), "unknown CPU")
    flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    return f"{model} ({', '.join(f for f in ('avx2', 'avx512f') if f in flags) or 'no AVX2'})"


def tokenizers(specs: list[str]) -> dict[str, object]:
    """{spec: tokenizer}: the bundled teacher's (SmolLM2, 49,152 tokens) for "teacher", derived ones otherwise."""
    from teachers import load_teacher
    from teachers.vocab import student_tokenizer

    teacher = load_teacher("smollm2-135m").tokenizer
    return {spec: student_tokenizer(teacher, spec) for spec in specs}


def prompt_ids(tokenizer, n: int) -> torch.Tensor:
    """The first n tokens of Persuasion in `tokenizer`, [1, n]."""
    from eval.bpb import read_eval_text

    ids = tokenizer.encode(read_eval_text("persuasion")[: 16 * n], add_special_tokens=False)[:n]
    return torch.tensor([ids])


def binary_rates(model: SpikeGPTForCausalLM) -> tuple[float, float]:
    """(input rate of the LM head, weighted mean input rate of all binary Linears) from the last forward."""
    layers = [m for m in model.modules() if isinstance(m, SpikeLinear) and m.binary_input and m.input_rate is not None]
    weights = [m.in_features * m.out_features for m in layers]
    mean = sum(w * m.input_rate for w, m in zip(weights, layers)) / sum(weights)
    head = model.lm_head.input_rate if model.lm_head.binary_input else float("nan")
    return head, mean


@torch.no_grad()
def set_firing_rate(model: SpikeGPTForCausalLM, ids: torch.Tensor, target: float, tol: float = 0.01,
                    rounds: int = 60) -> dict[str, float]:
    """Scale each LIF layer's threshold until it fires at target +- tol on ids (all layers at once, damped
    multiplicative steps); returns {LIF name: firing rate}."""
    lifs = {name: m for name, m in model.named_modules() if isinstance(m, LIF)}
    for _ in range(rounds):
        model(ids, skip_logits=True)
        rates = {name: m.firing_rate for name, m in lifs.items()}
        if all(abs(r - target) <= tol for r in rates.values()):
            break
        for name, m in lifs.items():
            step = ((rates[name] + 0.01) / (target + 0.01)) ** 0.5
            m.kwargs["v_threshold"] *= min(2.0, max(0.5, step))
    return rates


@torch.no_grad()
def continuation_rates(model: SpikeGPTForCausalLM, prompt: torch.Tensor, sequence: torch.Tensor):
    """binary_rates over the generated tokens only (the prompt's state carried in)."""
    state = state_of(model(prompt, use_cache=True, skip_logits=True))
    model(sequence[:, prompt.shape[1]:], skip_logits=True, **cache_kwargs(state))
    return binary_rates(model)


def hf_peers(cfg: SpikeGPTConfig) -> dict[str, torch.nn.Module]:
    w, n, ffn, v = cfg.d_model, cfg.n_layer, cfg.ffn_mult * cfg.d_model, cfg.vocab_size
    return {
        "HF RWKV-4": RwkvForCausalLM(RwkvConfig(vocab_size=v, hidden_size=w, num_hidden_layers=n, intermediate_size=ffn,
                                                attention_hidden_size=w, context_length=4096)).eval(),
        "HF Llama": LlamaForCausalLM(LlamaConfig(vocab_size=v, hidden_size=w, num_hidden_layers=n, intermediate_size=ffn,
                                                 num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head,
                                                 max_position_embeddings=4096)).eval(),
    }


class Stamps(LogitsProcessor):
    """Records (wall, thread CPU) time at each call: once per generated token, after the model's forward."""

    def __init__(self):
        self.stamps = []

    def __call__(self, input_ids, scores):
        self.stamps.append((time.perf_counter(), time.thread_time()))
        return scores

    def step_ms(self, clock: int) -> float:
        """Median ms between consecutive calls (clock 0: wall, 1: thread CPU time)."""
        return 1000 * statistics.median(b[clock] - a[clock] for a, b in zip(self.stamps, self.stamps[1:]))


@contextlib.contextmanager
def sparse(mode: str):
    """SPIKEDISTILL_SPARSE=mode inside the block."""
    old = os.environ.get("SPIKEDISTILL_SPARSE")
    os.environ["SPIKEDISTILL_SPARSE"] = mode
    try:
        yield
    finally:
        if old is None:
            del os.environ["SPIKEDISTILL_SPARSE"]
        else:
            os.environ["SPIKEDISTILL_SPARSE"] = old


def timed_generate(model, ids: torch.Tensor, new_tokens: int, mode: str) -> tuple[Stamps, torch.Tensor]:
    model.generation_config.eos_token_id = None  # every call runs to new_tokens
    model.generation_config.pad_token_id = 0
    stamps = Stamps()
    with sparse(mode):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens, do_sample=False,
                             logits_processor=LogitsProcessorList([stamps]))
    return stamps, out


def decode_rounds(model, peers, ids, new_tokens: int, rounds: int) -> dict:
    """Interleaved rounds of generate(): dense, event, peers. Returns {clock: {name: median ms}}, the median
    paired ratios event/dense per clock, whether the greedy tokens matched in every round, and the sequence."""
    runs = {"dense": (model, "off"), "event": (model, "auto"), **{k: (v, "auto") for k, v in peers.items()}}
    clocks = [0, 1] if torch.get_num_threads() == 1 else [0]
    ms = {c: {name: [] for name in runs} for c in clocks}
    same, sequence = True, None
    for _ in range(rounds):
        outs = {}
        for name, (m, mode) in runs.items():
            stamps, outs[name] = timed_generate(m, ids, new_tokens, mode)
            for c in clocks:
                ms[c][name].append(stamps.step_ms(c))
        same &= torch.equal(outs["dense"], outs["event"])
        sequence = outs["event"]
    ratio = {c: statistics.median(e / d for e, d in zip(ms[c]["event"], ms[c]["dense"])) for c in clocks}
    return {"ms": {c: {k: statistics.median(v) for k, v in ms[c].items()} for c in clocks}, "ratio": ratio,
            "same": same, "sequence": sequence}


def print_rows(name: str, model, ids, threads: list[int], args, peers) -> None:
    for n in threads:
        torch.set_num_threads(n)
        res = decode_rounds(model, peers, ids, args.new_tokens, args.rounds)
        head, mean = continuation_rates(model, ids, res["sequence"])
        for clock, ms in res["ms"].items():
            d, e, r, ll = ms["dense"], ms["event"], ms["HF RWKV-4"], ms["HF Llama"]
            print(f"| {name} | {n} | {('wall', 'cpu')[clock]} | {d:.2f} | {e:.2f} | **{res['ratio'][clock]:.2f}x** "
                  f"| {r:.2f} | {ll:.2f} | {e / r:.2f}x | {e / ll:.2f}x | {head:.2f} / {mean:.2f} "
                  f"| {'yes' if res['same'] else 'NO'} | {os.getloadavg()[0]:.1f} |")


TABLE_HEAD = ("| student | threads | clock | dense ms/step | event ms/step | event / dense | HF RWKV-4 | HF Llama "
              "| event vs RWKV | event vs Llama | decode rate head / all | same tokens | load |\n"
              "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|---|---:|")


def build_students(args) -> list[tuple[str, SpikeGPTForCausalLM, torch.Tensor]]:
    """(name, model, prompt ids) for each --vocab at --preset, and each --model directory."""
    out = []
    specs = [s for s in args.vocab.split(",") if s]
    for spec, tok in tokenizers(specs).items():
        torch.manual_seed(0)
        cfg = SpikeGPTConfig.from_preset(args.preset, vocab_size=len(tok))
        out.append((f"{args.preset} {spec} (V {len(tok):,})", SpikeGPTForCausalLM(cfg).eval(),
                    prompt_ids(tok, args.context)))
    for d in args.model:
        model = AutoModelForCausalLM.from_pretrained(d).float().eval()
        out.append((f"trained {d}", model, prompt_ids(AutoTokenizer.from_pretrained(d), args.context)))
    return out


def print_calibration(threads: list[int]) -> None:
    print("\n### Crossover calibration (students/ops/event_linear/calibrate.py): up to (rows, firing rate)")
    for n in threads:
        torch.set_num_threads(n)
        start = time.perf_counter()
        tables = calibrate.calibrate(n)
        took = time.perf_counter() - start
        print(f"- {n} thread(s), measured now in {took:.2f} s wall: small (2^17 weights) {tables['small']}, "
              f"large (>= 2^20) {tables['large']}; in use by this process: {calibrate.tables_now()}")


@torch.no_grad()
def profile_dense(model, ids, steps: int = 16) -> None:
    """Where a dense decode step (SPIKEDISTILL_SPARSE=off, forward only, 1 thread) goes: the head as the CPU
    time of a step minus that of a step without logits (interleaved), and the rest by torch.profiler's self time
    (wall clock) of each op over steps without logits; "Python and dispatch" is the profiled step's wall time
    minus all op time, the profiler's own overhead included."""
    from torch.profiler import ProfilerActivity, profile

    with sparse("off"), model.decoding():
        state = state_of(model(ids, use_cache=True, logits_to_keep=1))
        tok = ids[:, -1:]
        runs = {"step": {}, "without logits": {"skip_logits": True}}
        cpu = {name: [] for name in runs}
        for _ in range(steps):
            for name, kw in runs.items():
                start = time.thread_time()
                model(tok, use_cache=True, **kw, **cache_kwargs(state))
                cpu[name].append(time.thread_time() - start)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            start = time.perf_counter()
            for _ in range(steps):
                model(tok, use_cache=True, skip_logits=True, **cache_kwargs(state))
            profiled = (time.perf_counter() - start) / steps
    ms = {name: 1000 * statistics.median(v) for name, v in cpu.items()}
    parts = dict.fromkeys(["body Linears", "LIF ops", "WKV", "LayerNorm", "other torch ops"], 0.0)
    for e in prof.key_averages():
        part = {"aten::mm": "body Linears", "_LifScan": "LIF ops", "_Pointwise": "LIF ops", "_Shift": "LIF ops",
                "_Wkv": "WKV", "aten::native_layer_norm": "LayerNorm"}.get(e.key, "other torch ops")
        parts[part] += e.self_cpu_time_total / 1000 / steps
    parts["Python and dispatch"] = 1000 * profiled - sum(parts.values())
    print(f"\nDense decode step, 1 thread, CPU time (median of {steps}, interleaved): {ms['step']:.2f} ms = head "
          f"{ms['step'] - ms['without logits']:.2f} + the rest {ms['without logits']:.2f}. The rest under "
          f"torch.profiler, wall time (ops' self time; {1000 * profiled:.2f} ms per step with the profiler):")
    print("| " + " | ".join(parts) + " |\n|" + "---:|" * len(parts))
    print("| " + " | ".join(f"{v:.2f}" for v in parts.values()) + " |")


@torch.no_grad()
def profile_fused(model, ids, steps: int = 32) -> None:
    """A fused decode step (1 thread, CPU time): the whole forward, its C call, and the C call stopped before the
    head (a head rate limit below 0: decode_ops.cpp returns after the body). Each advances the state."""
    with sparse("on"), model.decoding():
        state = state_of(model(ids, use_cache=True, logits_to_keep=1))
        tok = ids[:, -1:]
        model(tok, use_cache=True, **cache_kwargs(state))  # binds the state to the fused step
        spec, lib = ctypes.addressof(model._fused.spec), library()
        logits, head = torch.empty(1, model.config.vocab_size), torch.empty(1, model.config.d_model)

        def c_call(head_max_rate):
            return lambda: lib.decode_step(spec, tok.data_ptr(), 1, logits.data_ptr(), head.data_ptr(),
                                           head_max_rate, 1)

        runs = {"forward": lambda: model(tok, use_cache=True, **cache_kwargs(state)), "C call": c_call(1.0),
                "body": c_call(-1.0)}
        times = {name: [] for name in runs}
        for _ in range(steps):
            for name, run in runs.items():
                start = time.thread_time()
                run()
                times[name].append(time.thread_time() - start)
    ms = {k: 1000 * statistics.median(v) for k, v in times.items()}
    print(f"Fused decode step, 1 thread, CPU time (median of {steps}): forward {ms['forward']:.3f} ms = C call "
          f"{ms['C call']:.3f} (body {ms['body']:.3f} + head {ms['C call'] - ms['body']:.3f}) + Python and "
          f"output {ms['forward'] - ms['C call']:.3f}")


def kernel_sweep(threads: list[int], repeats: int) -> None:
    """One Linear: gather-add vs dense matmul, by (in, out), rows and rate; ratio < 1: the event path is faster.

    A fresh spike pattern every call (64 of them in turn), so the rows of W^T a call reads are rarely cached."""
    shapes = [(128, 128), (128, 512), (512, 512), (512, 2048), (2048, 512), (128, VOCAB), (512, VOCAB)]
    rows_list, rates = [1, 4, 16, 32, 64, 256, 1024], [0.1, 0.3, 0.5, 0.7, 0.9]
    for n in threads:
        torch.set_num_threads(n)
        clock = time.thread_time if n == 1 else time.perf_counter  # 1 thread: CPU time, immune to descheduling
        print(f"\n### kernel sweep, {n} thread(s), {'thread CPU' if n == 1 else 'wall'} time: event / dense "
              f"(median of {repeats}; < 1: event faster)")
        print("| in x out | rows | " + " | ".join(f"rate {r}" for r in rates) + " |")
        print("|---|---:|" + "---:|" * len(rates))
        for k, out in shapes:
            w = torch.randn(out, k)
            wt = w.t().contiguous()
            for rows in rows_list:
                if rows * k * out > 2e9:
                    continue
                cells = []
                for rate in rates:
                    xs = [(torch.rand(rows, k) < rate).float() for _ in range(64)]
                    td, te = [], []
                    for i in range(repeats + 1):  # the first pair warms up
                        x = xs[i % len(xs)]
                        t0 = clock()
                        event_linear_reference(x, w)
                        t1 = clock()
                        event_linear_cpu(x, wt)
                        t2 = clock()
                        td.append(t1 - t0)
                        te.append(t2 - t1)
                    cells.append(f"{statistics.median(te[1:]) / statistics.median(td[1:]):.2f}")
                print(f"| {k} x {out} | {rows} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="demo")
    parser.add_argument("--vocab", default="teacher,subset:4096,subset:8192,bytes",
                        help="student.vocab specs of the random-init students ('' for none)")
    parser.add_argument("--model", action="append", default=[], help="a trained student directory (repeatable)")
    parser.add_argument("--rate", type=float, default=0.28, help="firing rate set on the prompt (0: as initialised)")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sweep", default="", help="more firing rates for the first student ('' to skip)")
    parser.add_argument("--profile", action="store_true", help="split a decode step of the first student")
    parser.add_argument("--kernels", action="store_true", help="also run the kernel sweep")
    parser.add_argument("--kernels-only", action="store_true", help="only the kernel sweep")
    parser.add_argument("--repeats", type=int, default=15, help="kernel sweep repeats")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    print(f"{cpu_name()}, {os.cpu_count()} CPUs, torch {torch.__version__}, load average {os.getloadavg()[0]:.1f} "
          f"at start; batch 1, fp32, greedy")
    if args.kernels_only:
        kernel_sweep(threads, args.repeats)
        return
    print_calibration(threads)
    models = build_students(args)
    print(f"\nPrompt: the first {args.context} tokens of Persuasion in each student's tokenizer; {args.new_tokens} new "
          f"tokens per generate(); medians over {args.rounds} interleaved rounds; firing rates set to {args.rate} on "
          "the prompt (0: as initialised)\n")
    print(TABLE_HEAD)
    for name, model, ids in models:
        if args.rate > 0:
            set_firing_rate(model, ids, args.rate)
        print_rows(name, model, ids, threads, args, hf_peers(model.config))
    if args.sweep:
        name, model, ids = models[0]
        print(f"\nFiring-rate sweep, {name}:\n\n{TABLE_HEAD}")
        for rate in (float(r) for r in args.sweep.split(",")):
            set_firing_rate(model, ids, rate)
            print_rows(f"{name}, rate {rate}", model, ids, threads, args, hf_peers(model.config))
    if args.profile:
        name, model, ids = models[0]
        if args.rate > 0:
            set_firing_rate(model, ids, args.rate)
        torch.set_num_threads(1)
        print(f"\n### Where a decode step goes: {name}")
        profile_dense(model, ids)
        profile_fused(model, ids)
    if args.kernels:
        kernel_sweep(threads, args.repeats)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
