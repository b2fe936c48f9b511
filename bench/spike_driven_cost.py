"""Quality cost of spike_driven=True against the released SpikeGPT layout (spike_driven=False).

Trains the same byte-level student twice (same seed, data order, steps) on the bundled Austen training text
and reports bits per byte on the first bytes of the training text and of the held-out Persuasion (windows
of `context` bytes, each from a fresh state). 1 thread, CPU.

    .venv/bin/python bench/spike_driven_cost.py [--steps 400] [--mixer srwkv]
"""
import argparse
import lzma
import math
import time
from pathlib import Path

import torch

from students import SpikeGPTConfig, SpikeGPTForCausalLM

CORPUS = Path(__file__).resolve().parents[1] / "teachers" / "corpus"


def load_bytes(name: str, limit: int) -> torch.Tensor:
    data = lzma.decompress((CORPUS / name).read_bytes())[:limit]
    return torch.tensor(list(data), dtype=torch.long)


def train_and_eval(spike_driven: bool, args, train: torch.Tensor, held_out: torch.Tensor) -> dict:
    torch.manual_seed(0)
    cfg = SpikeGPTConfig(vocab_size=256, n_layer=args.layers, d_model=args.width, n_head=4,
                         token_mixer=args.mixer, time_steps=args.time_steps, spike_driven=spike_driven)
    model = SpikeGPTForCausalLM(cfg).train()
    opt = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(0.9, 0.99))
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for _ in range(args.steps):
        offsets = torch.randint(0, len(train) - args.context - 1, (args.batch,), generator=gen)
        ids = torch.stack([train[o : o + args.context] for o in offsets.tolist()])
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    seconds = time.perf_counter() - start
    model.eval()
    return {"train_bpb": bits_per_byte(model, train[: len(held_out)], args.context),
            "bpb": bits_per_byte(model, held_out, args.context), "seconds": seconds}


@torch.no_grad()
def bits_per_byte(model, data: torch.Tensor, context: int) -> float:
    """Mean next-byte loss in bits over windows of `context` bytes, each from a fresh state."""
    windows = data[: len(data) // context * context].view(-1, context)
    return model(windows, labels=windows).loss.item() / math.log(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--mixer", default="srwkv")
    parser.add_argument("--time-steps", type=int, default=1)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--context", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    train = load_bytes("austen_train.txt.xz", 400_000)
    held_out = load_bytes("austen_eval_persuasion.txt.xz", 64 * args.context)
    print(f"byte-level {args.layers}x{args.width} {args.mixer} T={args.time_steps}, {args.steps} steps of "
          f"{args.batch}x{args.context} bytes, 1 thread; held-out: {len(held_out)} bytes of Persuasion")
    print("| layout | train-text bits/byte | held-out bits/byte | train s |")
    print("|---|---|---|---|")
    for spike_driven in (False, True):
        r = train_and_eval(spike_driven, args, train, held_out)
        name = "spike_driven=True" if spike_driven else "spike_driven=False (released)"
        print(f"| {name} | {r['train_bpb']:.3f} | {r['bpb']:.3f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
