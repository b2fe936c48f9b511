"""Teacher benchmark: forward tokens/s fp32 vs bf16, cache writing tokens/s, cache bytes/token and the KD-loss
error of top-k caches against full logits, all measured in this one run.

    .venv/bin/python bench/teacher.py [--teacher smollm2-135m] [--threads 2] [--repeats 3]

KD-loss error: forward KL(teacher || student) per token from a bf16 top-k cache (k + 1 tail bucket, read back
through TeacherCache) against the same loss from the full fp32 teacher logits. Two stand-in students, since no
trained student exists here: "near" = teacher logits + N(0, 1) noise, "far" = N(0, 2^2) random logits.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pipeline.losses import kd_loss
from teachers import load_teacher
from teachers.cache import TeacherCache, build_teacher_cache
from teachers.data import TokenDataset, prepare_corpus

KS = (16, 64, 256)


def forward_speed(teachers: dict, batch: torch.Tensor, repeats: int) -> dict[str, float]:
    """Median tokens/s of a logits forward per teacher, repeats interleaved so load drifts hit both."""
    times = {name: [] for name in teachers}
    for name, t in teachers.items():
        t(batch[:, :16])  # warm-up: first touch of the weights
    for _ in range(repeats):
        for name, t in teachers.items():
            t0 = time.perf_counter()
            t(batch, hidden_states=False)
            times[name].append(time.perf_counter() - t0)
    return {name: batch.numel() / statistics.median(ts) for name, ts in times.items()}


def agreement(fp32, bf16, batch: torch.Tensor) -> tuple[float, float]:
    """(KL(fp32 || bf16) nats/token, top-1 agreement) on batch."""
    p = torch.log_softmax(fp32(batch, hidden_states=False).logits.float(), -1)
    q = torch.log_softmax(bf16(batch, hidden_states=False).logits.float(), -1)
    kl = (p.exp() * (p - q)).sum(-1).mean().item()
    return kl, (p.argmax(-1) == q.argmax(-1)).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--rows", type=int, default=2, help="rows per forward batch and per cache")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    fp32 = load_teacher(args.teacher, dtype=torch.float32)
    bf16 = load_teacher(args.teacher, dtype=torch.bfloat16)
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "data"
        prepare_corpus(["bundled:persuasion"], fp32.tokenizer, data, seq_len=args.seq_len, val_fraction=0.0,
                       max_tokens=args.seq_len * args.rows * 2)
        ds = TokenDataset(data)
        batch = torch.stack([ds[i] for i in range(args.rows)])
        print(f"teacher {args.teacher}, {torch.get_num_threads()} threads, batch {tuple(batch.shape)}, "
              f"median of {args.repeats}")
        speed = forward_speed({"fp32": fp32, "bf16": bf16}, batch, args.repeats)
        kl, top1 = agreement(fp32, bf16, batch)
        print(f"forward tokens/s: fp32 {speed['fp32']:.0f}, bf16 {speed['bf16']:.0f}, "
              f"bf16/fp32 {speed['bf16'] / speed['fp32']:.2f}x; bf16 vs fp32 KL {kl:.4f} nats/token, "
              f"top-1 agreement {top1:.3f}")
        full = fp32(batch, hidden_states=False).logits.reshape(-1, fp32.vocab_size)
        students = {"near": full + torch.randn_like(full), "far": torch.randn_like(full) * 2}
        dense = {name: kd_loss(s, full).mean().item() for name, s in students.items()}
        print("k    cache tok/s (bf16 teacher)  bytes/token  KD error near (rel)    KD error far (rel)")
        for k in KS:
            stats = build_teacher_cache(bf16, data, Path(tmp) / f"cache{k}", k=k, batch_size=args.rows,
                                        shard_size=args.rows, progress=False)
            cache = TeacherCache(Path(tmp) / f"cache{k}")
            target = cache.batch(list(range(args.rows))).flatten()
            errs = [kd_loss(students[n], target).mean().item() - dense[n] for n in ("near", "far")]
            print(f"{k:<4} {stats['tokens_per_s']:>26.0f}  {cache.bytes_per_token:>11.1f}  "
                  f"{errs[0]:+.4f} ({errs[0] / dense['near']:+.2%})  {errs[1]:+.4f} ({errs[1] / dense['far']:+.2%})")
        print(f"dense KD loss (nats/token): near {dense['near']:.4f}, far {dense['far']:.4f}")


if __name__ == "__main__":
    main()
