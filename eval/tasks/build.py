"""Author the offline task data in eval/tasks/data/ from the held-out texts (deterministic: fixed seeds).

    python -m eval.tasks.build [--corpora DIR] [--out DIR]

Reads austen_eval_persuasion.txt.xz and shakespeare_eval_hamlet.txt.xz (the teachers package's bundled
corpus, else ../shared/corpora) and writes:
- ppl_{persuasion,hamlet}.jsonl: the first PPL_DOCS documents of each text, whole paragraphs packed into
  documents of at most PPL_DOC_CHARS characters (a longer paragraph is a document of its own): a bounded
  slice (~25-33 KB per text) so CPU runs take minutes;
- persuasion_next_sentence.jsonl: two sentences of context, pick the true next sentence among it and three
  sentences of similar length from at least 50 sentences away in the same book;
- hamlet_next_line.jsonl: a speaker and up to MAX_SPEECH_LINES lines of a speech, pick its true next line
  among it and three lines of similar length from other speeches;
- persuasion_cloze.jsonl: the previous sentence and a sentence without its last word, pick the word among
  it and three words that end other sentences and share its word-form class (capitalised or not, and
  suffix: -ly, -ing, -ed, -s, ...; a cheap stand-in for part of speech) and frequency band.
Rerunning the script reproduces the committed files byte for byte.
"""

from __future__ import annotations

import argparse
import json
import lzma
import random
import re
from collections import Counter
from pathlib import Path

DATA_DIR = Path(__file__).parent / "data"
PERSUASION = "austen_eval_persuasion.txt.xz"
HAMLET = "shakespeare_eval_hamlet.txt.xz"
PPL_DOCS = 16
PPL_DOC_CHARS = 2000
MC_ITEMS = 300
N_CHOICES = 4
MAX_SPEECH_LINES = 8  # context lines before the line to pick, so long soliloquies stay short contexts
SEED = 20260523

_SENTENCE_END = re.compile(r"(?<=[.!?])[\"']?\s+(?=[\"'A-Z])")
_SUFFIXES = ("ly", "ing", "ed", "tion", "ness", "ment", "ful", "ous", "er", "est", "s")


def corpora_dir(explicit: str | None) -> Path:
    """Where the held-out texts live: --corpora, the teachers package's corpus, or ../shared/corpora."""
    candidates = [Path(explicit)] if explicit else []
    candidates += [
        Path(__file__).resolve().parents[2] / "teachers" / "corpus",
        Path(__file__).resolve().parents[3] / "shared" / "corpora",
    ]
    for cand in candidates:
        if (cand / PERSUASION).is_file() and (cand / HAMLET).is_file():
            return cand
    raise SystemExit(
        f"build.py: {PERSUASION} and {HAMLET} not found in {[str(c) for c in candidates]}; pass --corpora DIR"
    )


def read_xz(path: Path) -> str:
    with lzma.open(path) as f:
        return f.read().decode("utf-8")


def ppl_docs(text: str) -> list[dict]:
    """Pack whole paragraphs (joined by a newline) into documents of at most PPL_DOC_CHARS characters."""
    docs, cur = [], ""
    for para in re.split(r"\n", text):
        if cur and len(cur) + 1 + len(para) > PPL_DOC_CHARS:
            docs.append({"text": cur})
            cur = ""
            if len(docs) == PPL_DOCS:
                break
        cur = f"{cur}\n{para}" if cur else para
    return docs


def sentences(text: str) -> list[str]:
    """Sentences of prose in reading order (split on . ! ? before a capital or a quote)."""
    out = []
    for para in text.split("\n"):
        out += [s.strip() for s in _SENTENCE_END.split(para) if s.strip()]
    return out


def similar_length(pool: list[str], target: str, rng: random.Random, k: int, exclude) -> list[str]:
    """k distinct items from pool within ±25% of len(target) (widening if too few), none in exclude."""
    for tol in (0.25, 0.5, 1.0, 10.0):
        lo, hi = len(target) * (1 - tol), len(target) * (1 + tol)
        cands = sorted({p for p in pool if lo <= len(p) <= hi and p not in exclude and p != target})
        if len(cands) >= k:
            return rng.sample(cands, k)
    raise SystemExit("build.py: not enough distractors; the text is too short")


def mc_item(context: str, gold: str, distractors: list[str], rng: random.Random) -> dict:
    choices = distractors + [gold]
    rng.shuffle(choices)
    return {"context": context, "choices": choices, "label": choices.index(gold)}


def next_sentence_items(text: str, rng: random.Random) -> list[dict]:
    sents = sentences(text)
    ok = [i for i in range(2, len(sents)) if 40 <= len(sents[i]) <= 200 and len(sents[i - 1]) <= 300]
    items = []
    for i in sorted(rng.sample(ok, MC_ITEMS)):
        far = sents[: max(0, i - 50)] + sents[i + 50 :]
        far = [s for s in far if 40 <= len(s) <= 200]
        distractors = similar_length(far, sents[i], rng, N_CHOICES - 1, exclude=set(sents[i - 2 : i + 1]))
        items.append(mc_item(f"{sents[i - 2]} {sents[i - 1]}", sents[i], distractors, rng))
    return items


def speeches(text: str) -> list[tuple[str, list[str]]]:
    """(speaker label, verse/prose lines) for each speech in the play; stage directions dropped."""
    out = []
    for block in re.split(r"\n\s*\n", text):
        lines = [
            ln.strip() for ln in block.strip().split("\n") if ln.strip() and not ln.strip().startswith("[")
        ]
        if len(lines) >= 2 and re.fullmatch(r"[A-Z][A-Za-z ]{0,20}\.", lines[0]):
            out.append((lines[0], lines[1:]))
    return out


def next_line_items(text: str, rng: random.Random) -> list[dict]:
    sp = speeches(text)
    cands = [(s, j) for s, (_, lines) in enumerate(sp) for j in range(2, len(lines)) if len(lines[j]) >= 20]
    all_lines = [(s, ln) for s, (_, lines) in enumerate(sp) for ln in lines if len(ln) >= 20]
    items = []
    for s, j in sorted(rng.sample(cands, MC_ITEMS)):
        speaker, lines = sp[s]
        pool = [ln for t, ln in all_lines if t != s]
        distractors = similar_length(pool, lines[j], rng, N_CHOICES - 1, exclude=set(lines))
        context = [speaker] + lines[max(0, j - MAX_SPEECH_LINES) : j]
        items.append(mc_item("\n".join(context), lines[j], distractors, rng))
    return items


def word_class(word: str) -> tuple[bool, str]:
    """(capitalised, suffix) of a word: the cloze distractors share it."""
    low = word.lower()
    return word[0].isupper(), next((s for s in _SUFFIXES if low.endswith(s) and len(low) > len(s) + 2), "")


def cloze_items(text: str, rng: random.Random) -> list[dict]:
    sents = sentences(text)
    ends = [re.fullmatch(r"(.*\S)\s+([A-Za-z]{3,})[.!?]", s) for s in sents]
    freq = Counter(m.group(2) for m in ends if m)
    classes = {w: word_class(w) for w in freq}
    ok = [
        i for i in range(1, len(sents)) if ends[i] and 30 <= len(sents[i]) <= 200 and len(sents[i - 1]) <= 300
    ]
    items = []
    for i in sorted(rng.sample(ok, MC_ITEMS)):
        prefix, word = ends[i].group(1), ends[i].group(2)
        band, cls = max(1, freq[word]).bit_length(), classes[word]
        others = [w for w in freq if w.lower() != word.lower()]
        # tightest pool with enough words: same class and frequency band, same class, same capitalisation
        pools = (
            [w for w in others if classes[w] == cls and abs(freq[w].bit_length() - band) <= 1],
            [w for w in others if classes[w] == cls],
            [w for w in others if classes[w][0] == cls[0]],
        )
        pool = sorted(next(p for p in pools if len(p) >= N_CHOICES - 1))
        items.append(mc_item(f"{sents[i - 1]} {prefix}", word, rng.sample(pool, N_CHOICES - 1), rng))
    return items


def write_jsonl(out_dir: Path, name: str, rows: list[dict]) -> None:
    with open(out_dir / name, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n" for row in rows)
    print(f"wrote {out_dir / name}: {len(rows)} items")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpora", help="directory holding the held-out .txt.xz files")
    parser.add_argument("--out", default=str(DATA_DIR), help="output directory (default: eval/tasks/data)")
    args = parser.parse_args(argv)
    src, out = corpora_dir(args.corpora), Path(args.out)
    persuasion, hamlet = read_xz(src / PERSUASION), read_xz(src / HAMLET)
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out, "ppl_persuasion.jsonl", ppl_docs(persuasion))
    write_jsonl(out, "ppl_hamlet.jsonl", ppl_docs(hamlet))
    write_jsonl(out, "persuasion_next_sentence.jsonl", next_sentence_items(persuasion, random.Random(SEED)))
    write_jsonl(out, "hamlet_next_line.jsonl", next_line_items(hamlet, random.Random(SEED + 1)))
    write_jsonl(out, "persuasion_cloze.jsonl", cloze_items(persuasion, random.Random(SEED + 2)))


if __name__ == "__main__":
    main()
