"""Exact targets over a subset student vocabulary: what they cost beside the teacher forward, in this one run.

    .venv/bin/python -m bench.subvocab [--teacher smollm2-135m] [--vocab subset:1024 subset:8192]
                                   [--rows 8] [--seq-len 128] [--threads 1] [--repeats 3]

Rows of `seq_len` student tokens of Persuasion (prepared with teachers.data.prepare_corpus, teacher views
included). Per student token, medians of interleaved repeats:
  plain    the teacher's own forward + head over the rows' teacher tokens (what targets over the teacher's
           vocabulary cost; the baseline of the ratios)
  branched the forward with the branch tokens appended (Teacher.branched) + head on the rows the targets read
  derive   PieceTrie.plan + derive: continuing and ending masses, normalisation ([L, V_s] log-probs)
and the share of student positions that need a branch token.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from teachers import load_teacher
from teachers.data import TokenDataset, prepare_corpus
from teachers.subvocab import PieceTrie
from teachers.vocab import VocabMap, student_tokenizer


def rows_of(teacher, spec: str, rows: int, seq_len: int, folder: str) -> tuple[list, PieceTrie]:
    vocab = VocabMap.build(teacher.tokenizer, student_tokenizer(teacher.tokenizer, spec), spec)
    prepare_corpus(["bundled:persuasion"], vocab.student_tokenizer, folder, seq_len, val_fraction=0.0,
                   max_tokens=(rows + 1) * seq_len * 2, vocab=vocab)
    ds = TokenDataset(folder)
    return [ds.teacher_view(i) for i in range(rows)], PieceTrie.from_vocab(vocab)


def time_parts(teacher, views: list, trie: PieceTrie) -> dict[str, float]:
    plans = [trie.plan(v) for v in views]
    t0 = time.perf_counter()
    for v in views:
        teacher(v.ids[None], hidden_states=False)
    t1 = time.perf_counter()
    states = teacher.branched([v.ids for v in views], [(p.branch_at, p.branch_tok) for p in plans])
    logprobs = []
    for plan, h in zip(plans, states):
        rows = trie.rows_needed(plan)
        logprobs.append((rows, torch.log_softmax(teacher.head(h[rows]).float(), -1)))
    t2 = time.perf_counter()
    for v, (rows, lp) in zip(views, logprobs):
        trie.derive(trie.plan(v), lp, rows)
    t3 = time.perf_counter()
    return {"plain": t1 - t0, "branched": t2 - t1, "derive": t3 - t2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--teacher", default="smollm2-135m")
    ap.add_argument("--vocab", nargs="+", default=["subset:1024", "subset:8192"])
    ap.add_argument("--rows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    teacher = load_teacher(args.teacher, dtype=torch.float32)
    print(f"{args.teacher} fp32, {args.threads} thread(s), {args.rows} rows x {args.seq_len} student tokens, "
          f"median of {args.repeats}; tree mask: {teacher.tree_mask_ok()}")
    print(f"{'vocab':>12} {'branch share':>12} {'plain ms/tok':>12} {'branched/plain':>14} {'derive/plain':>12}")
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.vocab:
            views, trie = rows_of(teacher, spec, args.rows, args.seq_len, f"{tmp}/{spec.replace(':', '-')}")
            time_parts(teacher, views[:1], trie)  # warm-up
            runs = [time_parts(teacher, views, trie) for _ in range(args.repeats)]
            med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
            tokens = sum(v.pos.numel() for v in views)
            share = sum(trie.plan(v).n_branches for v in views) / tokens
            print(f"{spec:>12} {share:>12.3f} {1e3 * med['plain'] / tokens:>12.2f} "
                  f"{med['branched'] / med['plain']:>14.2f} {med['derive'] / med['plain']:>12.3f}")


if __name__ == "__main__":
    main()
