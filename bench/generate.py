"""Per-token generation latency at context 64 and 2048: the spiking student against HF RWKV-4 and Llama.

All models are random-init, fp32, vocab 49,152, width 256, 4 layers, FFN 1024, batch 1, measured side by
side in one run at 1 thread. Each model prefills the context once, then decodes single tokens through its
cache / recurrent state (greedy, head included); the figure is the median over the timed steps.

    .venv/bin/python bench/generate.py [--steps 32] [--contexts 64 2048]
"""
import argparse
import contextlib
import statistics
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM, RwkvConfig, RwkvForCausalLM

from students import SpikeGPTConfig, SpikeGPTForCausalLM, cache_kwargs, state_of

VOCAB, WIDTH, LAYERS, FFN = 49152, 256, 4, 1024


def student(mixer: str, steps: int = 1) -> SpikeGPTForCausalLM:
    cfg = SpikeGPTConfig(vocab_size=VOCAB, n_layer=LAYERS, d_model=WIDTH, n_head=4, ffn_mult=FFN // WIDTH,
                         token_mixer=mixer, time_steps=steps)
    return SpikeGPTForCausalLM(cfg)


def hf_rwkv() -> RwkvForCausalLM:
    return RwkvForCausalLM(RwkvConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS,
                                      intermediate_size=FFN, attention_hidden_size=WIDTH, context_length=4096))


def hf_llama() -> LlamaForCausalLM:
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=WIDTH, num_hidden_layers=LAYERS,
                                        intermediate_size=FFN, num_attention_heads=4, num_key_value_heads=4,
                                        max_position_embeddings=4096))


def prefill(model, ids: torch.Tensor):
    """Run the context once; returns (cache, next token [1, 1])."""
    if isinstance(model, RwkvForCausalLM):
        out = model(ids, use_cache=True, logits_to_keep=1)
        return out.state, out.logits[:, -1:].argmax(-1)
    out = model(ids, use_cache=True, logits_to_keep=1)
    return state_of(out), out.logits[:, -1:].argmax(-1)


def step(model, token: torch.Tensor, cache):
    """One decode step: (new cache, next token [1, 1])."""
    if isinstance(model, RwkvForCausalLM):
        out = model(token, state=cache, use_cache=True)
        return out.state, out.logits[:, -1:].argmax(-1)
    out = model(token, use_cache=True, logits_to_keep=1, **cache_kwargs(cache))
    return state_of(out), out.logits[:, -1:].argmax(-1)


@torch.no_grad()
def ms_per_token(model, context: int, steps: int, warmup: int = 3) -> float:
    ids = torch.randint(0, VOCAB, (1, context), generator=torch.Generator().manual_seed(0))
    cache, token = prefill(model, ids)
    times = []
    # As in SpikeGPTForCausalLM.generate: decode steps do not record firing rates.
    lean = model.rates_paused() if isinstance(model, SpikeGPTForCausalLM) else contextlib.nullcontext()
    with lean:
        for i in range(warmup + steps):
            start = time.perf_counter()
            cache, token = step(model, token, cache)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=32, help="timed decode steps per context")
    parser.add_argument("--contexts", type=int, nargs=2, default=[64, 2048])
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    short, long = args.contexts
    models = {
        "student srwkv (T=1)": student("srwkv"),
        "student sfsa_linear (T=1)": student("sfsa_linear"),
        "student sfsa (T=1)": student("sfsa"),
        "student srwkv (T=2)": student("srwkv", steps=2),
        "HF RwkvForCausalLM": hf_rwkv(),
        "HF LlamaForCausalLM": hf_llama(),
    }
    results = {}
    for name, model in models.items():
        model.eval()
        results[name] = (ms_per_token(model, short, args.steps), ms_per_token(model, long, args.steps))
    rwkv, llama = results["HF RwkvForCausalLM"], results["HF LlamaForCausalLM"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread, fp32, batch 1, vocab {VOCAB}, "
          f"width {WIDTH}, {LAYERS} layers, FFN {FFN}; median of {args.steps} decode steps")
    print(f"| model | ms/token @{short} | ms/token @{long} | ratio {long}/{short} | vs RWKV @{long} "
          f"| vs Llama @{long} |")
    print("|---|---|---|---|---|---|")
    for name, (a, b) in results.items():
        print(f"| {name} | {a:.2f} | {b:.2f} | {b / a:.2f} | {b / rwkv[1]:.2f} | {b / llama[1]:.2f} |")


if __name__ == "__main__":
    main()
