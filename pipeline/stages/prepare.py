"""Stage prepare: tokenize the corpus with the teacher's tokenizer, pack rows of seq_len, split, memory-map.

Outputs: {"dataset": dir (teachers.data format: train.bin, val.bin, meta.json), "tokenizer": dir (the
teacher's tokenizer, saved so later stages load it without loading the teacher)}.
`data.max_train_tokens` keeps only the first tokens of the sources (in source order, cut at a line end).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.errors import ConfigError
from pipeline.stages import StageContext, StageResult

# a generous bytes-per-token guess for the first cut; the loop below extends it when it falls short
_BYTES_PER_TOKEN_GUESS = 6


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    """The teacher's tokenizer, without loading its weights when the spec is a hub id or a HF directory."""
    from transformers import AutoTokenizer

    path = Path(spec)
    is_hf_dir = path.is_dir() and any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    is_hub_id = "/" in spec and not path.exists() and not spec.endswith(".gguf")
    if is_hf_dir or is_hub_id:
        return AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code)
    from teachers import load_teacher

    return load_teacher(spec, trust_remote_code=trust_remote_code).tokenizer


def expand_sources(sources: list[str]) -> list[str]:
    """'bundled' -> the bundled training texts; anything else is passed through."""
    out: list[str] = []
    for src in sources:
        if src == "bundled":
            from teachers.data import bundled_corpus

            out += [str(p) for p in bundled_corpus()["train"]]
        else:
            out.append(src)
    return out


def _cut_to_tokens(text: str, tokenizer, budget: int) -> tuple[str, int]:
    """A prefix of `text` (ending at a line end where possible) of at most `budget` tokens, close to it."""
    best, best_n, guess = "", 0, budget * _BYTES_PER_TOKEN_GUESS
    for _ in range(12):  # a few secant steps on chars-per-token converge; the bound only guards the loop
        end = len(text) if guess >= len(text) else text.rfind("\n", 0, guess) + 1 or guess
        head = text[:end]
        n = len(tokenizer(head, add_special_tokens=False)["input_ids"])
        if n <= budget and n >= best_n:
            best, best_n = head, n
        if (n <= budget and (end == len(text) or n >= 0.97 * budget)) or end <= 1:
            break
        guess = max(1, int(end * budget / max(n, 1) * (0.98 if n > budget else 1.02)))
    return best, best_n


def limit_sources(sources: list[str], tokenizer, max_tokens: int, out_dir: Path) -> list[str]:
    """Copies of the first text sources holding at most `max_tokens` tokens (written under out_dir)."""
    from teachers.data import read_text

    out_dir.mkdir(parents=True, exist_ok=True)
    kept, left = [], max_tokens
    for i, src in enumerate(sources):
        if left <= 0:
            break
        name = Path(src).name
        if not name.endswith((".txt", ".txt.xz")):
            raise ConfigError(f"data.max_train_tokens: works with .txt/.txt.xz sources only, got {src}; "
                              "set data.max_train_tokens=null")
        text, n = _cut_to_tokens(read_text(Path(src)), tokenizer, left)
        path = out_dir / f"{i:03d}-{name.removesuffix('.xz')}"
        path.write_text(text, encoding="utf-8")
        kept.append(str(path))
        left -= n
    return kept


def run(ctx: StageContext) -> StageResult:
    """Tokenize, pack and split `data.sources` into ctx.stage_dir/dataset."""
    from teachers.data import prepare_corpus

    r = ctx.recipe
    tokenizer = load_tokenizer(r.teacher.spec, r.teacher.trust_remote_code)
    tok_dir = ctx.stage_dir / "tokenizer"
    tokenizer.save_pretrained(tok_dir)
    sources = expand_sources(list(r.data.sources))
    if r.data.max_train_tokens:
        sources = limit_sources(sources, tokenizer, r.data.max_train_tokens, ctx.stage_dir / "sources")
    out = ctx.stage_dir / "dataset"
    if out.exists():  # a killed earlier attempt: start over, nothing partial is reused
        shutil.rmtree(out)
    stats = prepare_corpus(sources, tokenizer, out, seq_len=r.data.seq_len, val_fraction=r.data.val_fraction,
                           seed=r.run.seed, separator=r.data.separator, text_field=r.data.text_field)
    ctx.log.info("prepare: %s", ", ".join(f"{k}={v}" for k, v in stats.items() if isinstance(v, (int, float))))
    return StageResult(outputs={"dataset": str(out), "tokenizer": str(tok_dir)}, metrics=dict(stats))
