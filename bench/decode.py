"""Decode latency of the event-driven path: ms/token at batch 1 after a long prompt, dense vs event-driven.

For each student (a trained model directory and/or a preset at random init) and thread count: the firing rate
its binary Linears read on real text (Persuasion), decode ms/token (wall clock, and at 1 thread also the
decoding thread's CPU time, which a busy shared machine does not inflate) with SPIKEDISTILL_SPARSE=off (dense) and
auto (event-driven where the dispatch picks it), and HF RWKV-4 and Llama of equal size (width, depth, FFN,
vocabulary). The decode loops of all four run interleaved step by step (each with its own cache), so a load
change on a shared machine hits them alike; the figure is the median over the timed steps. Then a firing-rate
sweep (the LIF threshold scaled, so every layer fires more or less; LayerNorm-fed LIFs stay below ~0.5, as half
their inputs are negative) and a kernel sweep (one Linear, dense vs gather-add by rows and rate up to 0.9) give
the rate where the two paths cross and back the dispatch's limits.

    .venv/bin/python -m bench.decode [--model DIR] [--presets 46m] [--threads 1,2] [--context 512] [--steps 24]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, RwkvConfig, RwkvForCausalLM

import students  # noqa: F401  (registers spikegpt)
from students import SpikeGPTConfig, SpikeGPTForCausalLM, cache_kwargs, state_of
from students.layers import LIF, SpikeLinear
from students.ops.event_linear import event_linear_reference
from students.ops.event_linear.cpu import event_linear_cpu

VOCAB = 49152


@contextlib.contextmanager
def sparse(mode: str):
    old = os.environ.get("SPIKEDISTILL_SPARSE")
    os.environ["SPIKEDISTILL_SPARSE"] = mode
    try:
        yield
    finally:
        if old is None:
            del os.environ["SPIKEDISTILL_SPARSE"]
        else:
            os.environ["SPIKEDISTILL_SPARSE"] = old


def prompt_ids(n: int) -> torch.Tensor:
    """The first n tokens of Persuasion under the bundled teacher's tokenizer (SmolLM2: vocab 49,152)."""
    from eval.bpb import read_eval_text
    from teachers import load_teacher

    tok = load_teacher("smollm2-135m").tokenizer
    ids = tok.encode(read_eval_text("persuasion")[: 8 * n])[:n]
    return torch.tensor([ids])


def binary_rates(model: SpikeGPTForCausalLM) -> tuple[float, float]:
    """(input rate of the LM head, weighted mean input rate of all binary Linears) from the last forward."""
    layers = [m for m in model.modules() if isinstance(m, SpikeLinear) and m.binary_input and m.input_rate is not None]
    weights = [m.in_features * m.out_features for m in layers]
    mean = sum(w * m.input_rate for w, m in zip(weights, layers)) / sum(weights)
    head = model.lm_head.input_rate if model.lm_head.binary_input else float("nan")
    return head, mean


def hf_peers(cfg: SpikeGPTConfig) -> dict[str, torch.nn.Module]:
    w, n, ffn, v = cfg.d_model, cfg.n_layer, cfg.ffn_mult * cfg.d_model, cfg.vocab_size
    return {
        "HF RWKV-4": RwkvForCausalLM(RwkvConfig(vocab_size=v, hidden_size=w, num_hidden_layers=n, intermediate_size=ffn,
                                                attention_hidden_size=w, context_length=4096)).eval(),
        "HF Llama": LlamaForCausalLM(LlamaConfig(vocab_size=v, hidden_size=w, num_hidden_layers=n, intermediate_size=ffn,
                                                 num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_head,
                                                 max_position_embeddings=4096)).eval(),
    }


class Decoder:
    """One model's decode loop (own cache), stepped one token at a time; `mode` sets SPIKEDISTILL_SPARSE."""

    def __init__(self, model, ids: torch.Tensor, mode: str = "auto"):
        self.model, self.mode, self.times, self.cpu_times = model, mode, [], []
        with torch.no_grad(), sparse(mode):
            if isinstance(model, RwkvForCausalLM):
                out = model(ids, use_cache=True)
                self.cache = out.state
            else:
                out = model(ids, use_cache=True, logits_to_keep=1)
                self.cache = state_of(out)
        self.token = out.logits[:, -1:].argmax(-1)

    def step(self, timed: bool) -> None:
        m = self.model
        lean = m.rates_paused() if isinstance(m, SpikeGPTForCausalLM) else contextlib.nullcontext()
        with torch.no_grad(), sparse(self.mode), lean:
            start, cpu_start = time.perf_counter(), time.thread_time()
            if isinstance(m, RwkvForCausalLM):
                out = m(self.token, state=self.cache, use_cache=True)
                self.cache = out.state
            else:
                out = m(self.token, use_cache=True, logits_to_keep=1, **cache_kwargs(self.cache))
                self.cache = state_of(out)
            self.token = out.logits[:, -1:].argmax(-1)
            if timed:
                self.times.append(time.perf_counter() - start)
                self.cpu_times.append(time.thread_time() - cpu_start)

    def ms(self, clock: str) -> float:
        return 1000 * statistics.median(self.times if clock == "wall" else self.cpu_times)


def interleaved(decoders: dict[str, Decoder], steps: int, warmup: int = 3) -> dict[str, dict[str, float]]:
    """{clock: {name: median ms/token}}; clock "cpu" (the calling thread's CPU time) only at 1 thread, where all
    the work runs on that thread, so time spent descheduled by other jobs does not count."""
    for i in range(warmup + steps):
        for d in decoders.values():
            d.step(timed=i >= warmup)
    clocks = ["wall", "cpu"] if torch.get_num_threads() == 1 else ["wall"]
    return {c: {name: d.ms(c) for name, d in decoders.items()} for c in clocks}


def scaled_threshold(model: SpikeGPTForCausalLM, factor: float) -> None:
    for m in model.modules():
        if isinstance(m, LIF):
            m.kwargs["v_threshold"] = model.config.lif_threshold * factor


def decode_table(name: str, model: SpikeGPTForCausalLM, ids: torch.Tensor, threads: list[int], steps: int) -> None:
    peers = hf_peers(model.config)
    with torch.no_grad(), sparse("off"):
        model(ids)
    head, mean = binary_rates(model)
    print(f"\n### {name}: {model.num_parameters() / 1e6:.1f}M parameters, context {ids.shape[1]}, firing rate "
          f"read by the head {head:.3f}, by all binary Linears (weighted by size) {mean:.3f}")
    print("| threads | clock | dense ms/token | event ms/token | event / dense | HF RWKV-4 | HF Llama "
          "| event vs RWKV | event vs Llama |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for n in threads:
        torch.set_num_threads(n)
        dec = {"dense": Decoder(model, ids, "off"), "event": Decoder(model, ids, "auto")}
        dec.update({k: Decoder(v, ids) for k, v in peers.items()})
        for clock, ms in interleaved(dec, steps).items():
            d, e, r, ll = ms["dense"], ms["event"], ms["HF RWKV-4"], ms["HF Llama"]
            print(f"| {n} | {clock} | {d:.2f} | {e:.2f} | {e / d:.2f}x | {r:.2f} | {ll:.2f} | {e / r:.2f}x "
                  f"| {e / ll:.2f}x |")


def rate_sweep(name: str, model: SpikeGPTForCausalLM, ids: torch.Tensor, threads: list[int], steps: int,
               factors: list[float]) -> None:
    print(f"\n### {name}: firing-rate sweep (LIF threshold x factor), decode ms/token, context {ids.shape[1]}")
    print("| threads | clock | threshold x | head rate | mean rate | dense | event | event / dense |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for n in threads:
        torch.set_num_threads(n)
        for f in factors:
            scaled_threshold(model, f)
            with torch.no_grad(), sparse("off"):
                model(ids)
            head, mean = binary_rates(model)
            dec = {"dense": Decoder(model, ids, "off"), "event": Decoder(model, ids, "auto")}
            for clock, ms in interleaved(dec, steps).items():
                print(f"| {n} | {clock} | {f:g} | {head:.3f} | {mean:.3f} | {ms['dense']:.2f} | {ms['event']:.2f} "
                      f"| {ms['event'] / ms['dense']:.2f}x |")
        scaled_threshold(model, 1.0)


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
    parser.add_argument("--model", action="append", default=[], help="a trained student directory (repeatable)")
    parser.add_argument("--presets", default="46m", help="presets at random init, vocab 49,152 ('' for none)")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--steps", type=int, default=24, help="timed decode steps")
    parser.add_argument("--sweep", default="2,1.5,1,0.5", help="LIF threshold factors ('' to skip)")
    parser.add_argument("--sweep-steps", type=int, default=12)
    parser.add_argument("--kernels", action="store_true", help="also run the kernel sweep")
    parser.add_argument("--kernels-only", action="store_true", help="only the kernel sweep")
    parser.add_argument("--repeats", type=int, default=15, help="kernel sweep repeats")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    factors = [float(f) for f in args.sweep.split(",")] if args.sweep else []
    torch.manual_seed(0)
    if args.kernels_only:
        kernel_sweep(threads, args.repeats)
        return
    ids = prompt_ids(args.context)
    load = os.getloadavg()[0]
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, load average {load:.1f} at start; batch 1, fp32, "
          f"prompt: the first {ids.shape[1]} tokens of Persuasion; median of {args.steps} decode steps after 3 "
          "warm-up steps, the models interleaved step by step")
    models = [(f"trained {d}", AutoModelForCausalLM.from_pretrained(d).float().eval()) for d in args.model]
    for p in filter(None, args.presets.split(",")):
        models.append((f"preset {p} (random init)",
                       SpikeGPTForCausalLM(SpikeGPTConfig.from_preset(p, vocab_size=VOCAB)).eval()))
    for name, model in models:
        decode_table(name, model, ids, threads, args.steps)
        if factors:
            rate_sweep(name, model, ids, threads, args.sweep_steps, factors)
    if args.kernels:
        kernel_sweep(threads, args.repeats)
    print(f"\nload average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
