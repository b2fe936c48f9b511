"""Exact targets over a derived student vocabulary: what the branch tokens cost, and what a branch floor saves.

    .venv/bin/python -m bench.subvocab [--teacher smollm2-135m] [--vocab bytes subset:4096 subset:8192]
        [--text persuasion] [--max-bytes 20000] [--seq-len 128] [--batch-size 8] [--floors 1e-6 1e-5 1e-4 1e-3 1e-2]
        [--threads 1]

The first --max-bytes UTF-8 bytes of a bundled text, prepared as the study does: in the teacher's vocabulary
(rows of --seq-len tokens) and in each student vocabulary (rows of seq_len x its student tokens per teacher
token, so every row holds about the same text). Per student vocabulary:
  targets  one pass evaluating every branch token: per student position the relative ending mass r of its
           branch (teachers.subvocab.PieceTrie.ending_share), its exact targets and its targets with the branch
           skipped. A floor eps skips the branches with r < eps, and positions are derived independently, so
           the targets at eps are the exact ones but at those positions. Reported per eps: the share of
           branches skipped, the mean (over all positions) and largest total variation from the exact targets,
           and the teacher's bits/byte through the targets (-log2 of each next student token, per byte of it,
           positions but each row's last). Also the mean TV / r over all branches under three rules for a
           skipped branch's ending mass: split by the distribution after T_j (the rule used), dropped (the rest
           renormalised), split by the distribution after the shorter token alone (no context).
  cost     build_teacher_cache (k 64, bf16, --batch-size rows a batch) at eps = 0 and each floor: CPU seconds
           (time.process_time, so other jobs' load counts less than in wall time) relative to
           build_teacher_cache in the teacher's vocabulary over the same text, measured in the same run (before
           and after the vocabulary's builds; their mean is the baseline).
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from teachers import load_teacher
from teachers.cache import build_teacher_cache
from teachers.data import TokenDataset, bundled_corpus, encode_nested, prepare_corpus, read_text
from teachers.subvocab import PieceTrie
from teachers.vocab import VocabMap, student_tokenizer

RULES = ("after T_j", "dropped", "after t_pi alone")


@dataclass
class Positions:
    """Per student position of the rows (all [N] float64): r (NaN: no branch token), the TV from the exact
    targets with the branch skipped under each rule ([N, 3]), the TV by which a cache's bf16 storage moves the
    exact top-64 (the study's teacher_cache.value_dtype: a yardstick of negligible), -log2 of the next student
    token exactly and with the branch skipped (the rule used; NaN at each row's last position), and that
    token's bytes."""

    share: torch.Tensor
    tv: torch.Tensor
    bf16_tv: torch.Tensor
    bits_exact: torch.Tensor
    bits_skipped: torch.Tensor
    nbytes: torch.Tensor


def token_bytes(tokenizer) -> torch.Tensor:
    """UTF-8 bytes of each student token: one per byte-level symbol, 0 for special tokens."""
    special = set(tokenizer.all_special_ids)
    return torch.tensor([0 if i in special else len(tokenizer.convert_ids_to_tokens(i)) for i in range(len(tokenizer))],
                        dtype=torch.float64)


def prepare(teacher, spec: str, text: str, args, folder: Path) -> tuple[TokenDataset, VocabMap | None]:
    """The text prepared in `spec`'s vocabulary (the teacher's for "teacher"), rows scaled to the same text."""
    if spec == "teacher":
        prepare_corpus([f"bundled:{args.text}"], teacher.tokenizer, folder, args.seq_len, val_fraction=0.0,
                       max_bytes=args.max_bytes)
        return TokenDataset(folder), None
    vocab = VocabMap.build(teacher.tokenizer, student_tokenizer(teacher.tokenizer, spec), spec)
    teacher_ids, student_ids, _, _ = encode_nested(vocab, text)
    seq_len = round(args.seq_len * len(student_ids) / len(teacher_ids))
    prepare_corpus([f"bundled:{args.text}"], vocab.student_tokenizer, folder, seq_len, val_fraction=0.0,
                   max_bytes=args.max_bytes, vocab=vocab)
    return TokenDataset(folder), vocab


def alone_logprobs(teacher, tokens: list[int], memo: dict[int, torch.Tensor]) -> torch.Tensor:
    """The teacher's next-token log-probs after each token alone, with no context -> [n, V]."""
    new = sorted({t for t in tokens if t not in memo})
    if new:
        with torch.no_grad():
            logits = teacher(torch.tensor(new)[:, None], hidden_states=False).logits[:, 0]
        memo.update(zip(new, torch.log_softmax(logits.float(), -1)))
    return torch.stack([memo[t] for t in tokens]) if tokens else torch.zeros(0, teacher.vocab_size)


def row_positions(teacher, trie: PieceTrie, plan, h: torch.Tensor, target: torch.Tensor, nbytes: torch.Tensor,
                  memo: dict) -> Positions:
    """One row's Positions from its states h [T_w + n_b, H] (every branch evaluated); target [L]: the row's ids."""
    lp = torch.log_softmax(teacher.head(h).float(), -1)
    main = torch.arange(plan.n_main)
    exact = trie.derive(plan, lp).double()
    at = torch.nonzero(plan.next_row >= plan.n_main).squeeze(1)
    after_t = trie.derive(trie.skip_branches(plan, torch.ones(plan.n_branches, dtype=torch.bool)), lp[main], main)
    no_end = torch.where(plan.next_row >= plan.n_main, -1, plan.next_row)
    dropped = trie.derive(replace(plan, next_row=no_end, end_tok=torch.where(no_end >= 0, plan.end_tok, -1)),
                          lp[main], main)
    alone = trie.derive(plan, torch.cat([lp[main], alone_logprobs(teacher, plan.branch_tok.tolist(), memo)]))
    share = torch.full((len(target),), math.nan, dtype=torch.float64)
    share[at] = trie.ending_share(plan, lp)
    tv = torch.stack([(rule.double().exp() - exact.exp()).abs().sum(-1) / 2 for rule in (after_t, dropped, alone)], 1)
    top = exact.topk(64, -1).values
    bf16_tv = (top.exp() - top.to(torch.bfloat16).double().exp()).abs().sum(-1) / 2
    nxt = torch.cat([target[1:], target[:1]])[:, None]
    bits = [-x.gather(1, nxt)[:, 0] / math.log(2) for x in (exact, after_t.double())]
    for b in bits:
        b[-1] = math.nan  # the row's last position predicts the next row's first token
    return Positions(share, tv, bf16_tv, bits[0], bits[1], nbytes[nxt[:, 0]])


def analyse(teacher, ds: TokenDataset, trie: PieceTrie, nbytes: torch.Tensor, batch: int) -> Positions:
    rows, memo = [], {}
    for start in range(0, len(ds), batch):
        views = [ds.teacher_view(i) for i in range(start, min(start + batch, len(ds)))]
        plans = [trie.plan(v) for v in views]
        states = teacher.branched([v.ids for v in views], [(p.branch_at, p.branch_tok) for p in plans])
        rows += [row_positions(teacher, trie, p, h, ds[start + i], nbytes, memo)
                 for i, (p, h) in enumerate(zip(plans, states))]
    return Positions(*(torch.cat([getattr(r, f) for r in rows]) for f in Positions.__dataclass_fields__))


def at_floor(pos: Positions, eps: float) -> dict[str, float]:
    """Skipped share, mean and max TV, bits/byte of the targets at floor eps."""
    skip = pos.share < eps  # NaN: no branch
    tv = torch.where(skip, pos.tv[:, 0], 0.0)
    bits = torch.where(skip, pos.bits_skipped, pos.bits_exact)
    scored = ~bits.isnan()
    branches = int((~pos.share.isnan()).sum())
    return {"skipped": float(skip.sum()) / max(branches, 1), "tv_mean": float(tv.mean()), "tv_max": float(tv.max()),
            "bpb": float(bits[scored].sum() / pos.nbytes[scored].sum())}


def build_cpu(teacher, folder: Path, vocab, eps: float, batch: int, out: Path) -> tuple[float, dict]:
    """CPU seconds of one build_teacher_cache, and its stats."""
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.process_time()
    stats = build_teacher_cache(teacher, folder, out, k=64, batch_size=batch, value_dtype="bf16", progress=False,
                                vocab=vocab, branch_floor=eps, overwrite=True)
    return time.process_time() - t0, stats


def report(spec: str, ds: TokenDataset, pos: Positions, floors: list[float], cpu: dict, base_cpu: float,
           base_tokens: int, builds: dict) -> None:
    branches = int((~pos.share.isnan()).sum())
    ratio = (pos.tv / pos.share[:, None])[~pos.share.isnan()].mean(0)
    print(f"\n{spec}: {len(ds)} rows x {ds.seq_len}, {len(pos.share)} positions, {branches / len(pos.share):.3f} with a "
          f"branch token; mean TV / r over the branches: " + ", ".join(f"{n} {v:.3f}" for n, v in zip(RULES, ratio))
          + f"; bf16 storage of the exact top-64: mean TV {float(pos.bf16_tv.mean()):.2e}")
    print(f"{'eps':>7} {'skipped':>8} {'build evaluated':>15} {'mean TV':>9} {'max TV':>9} {'bits/byte':>10} "
          f"{'d bpb rel':>10} {'CPU / teacher-vocab':>19} {'CPU ms/tok':>10}")
    exact_bpb = at_floor(pos, 0.0)["bpb"]
    per_token = base_cpu / base_tokens
    for eps in [0.0, *floors]:
        m, b = at_floor(pos, eps), builds[eps]["branches"]
        print(f"{eps:>7.0e} {m['skipped']:>8.4f} {b['evaluated']:>7}/{b['needed']:<7} {m['tv_mean']:>9.2e} "
              f"{m['tv_max']:>9.2e} {m['bpb']:>10.5f} {(m['bpb'] - exact_bpb) / exact_bpb:>10.2e} "
              f"{cpu[eps] / base_cpu:>19.2f} {1e3 * cpu[eps] / len(pos.share):>10.2f}")
    print(f"teacher-vocab build: {1e3 * per_token:.2f} CPU ms per teacher token")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--vocab", nargs="+", default=["bytes", "subset:4096", "subset:8192"])
    ap.add_argument("--text", default="persuasion")
    ap.add_argument("--max-bytes", type=int, default=20_000)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--floors", nargs="+", type=float, default=[1e-6, 1e-5, 1e-4, 1e-3, 1e-2])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    teacher = load_teacher(args.teacher, dtype=torch.float32)
    text = read_text(bundled_corpus()[args.text]).encode()[: args.max_bytes].decode(errors="ignore")
    print(f"{args.teacher} fp32, {args.threads} thread(s), first {args.max_bytes} bytes of {args.text}; "
          f"branch step over the KV cache: {teacher.tree_mask_ok()}; load average {os.getloadavg()[0]:.1f}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base_ds, _ = prepare(teacher, "teacher", text, args, root / "teacher")
        base_tokens = len(base_ds) * base_ds.seq_len
        for spec in args.vocab:
            folder = root / spec.replace(":", "-")
            ds, vocab = prepare(teacher, spec, text, args, folder)
            trie = PieceTrie.from_vocab(vocab)
            pos = analyse(teacher, ds, trie, token_bytes(vocab.student_tokenizer), args.batch_size)
            base = [build_cpu(teacher, root / "teacher", None, 0.0, args.batch_size, root / "base")[0]]
            cpu, builds = {}, {}
            for eps in [0.0, *args.floors]:
                cpu[eps], builds[eps] = build_cpu(teacher, folder, vocab, eps, args.batch_size, root / "cache")
            base.append(build_cpu(teacher, root / "teacher", None, 0.0, args.batch_size, root / "base")[0])
            print(f"teacher-vocab build CPU s before / after: {base[0]:.1f} / {base[1]:.1f}; "
                  f"load average {os.getloadavg()[0]:.1f}")
            report(spec, ds, pos, args.floors, cpu, sum(base) / 2, base_tokens, builds)


if __name__ == "__main__":
    main()
