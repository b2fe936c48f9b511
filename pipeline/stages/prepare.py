"""Stage prepare: tokenize the corpus with the teacher's tokenizer, pack rows of seq_len, split, memory-map.

Outputs: {"dataset": dir (teachers.data format: train.bin, val.bin, meta.json), "tokenizer": dir (the
teacher's tokenizer, saved so later stages load it without loading the teacher)}.
`data.max_train_tokens` keeps only the first tokens of the sources, in source order ("bundled" = the bundled
training texts, Austen first); `data.max_train_bytes` instead keeps the first UTF-8 bytes of their text (the
same text whatever the tokenizer).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.stages import StageContext, StageResult, split_seed


def load_tokenizer(spec: str, trust_remote_code: bool = False, dtype: str = "bf16"):
    """The teacher's tokenizer; from a local HF directory without loading weights, else via load_teacher
    (which resolves aliases, GGUF files and Hub ids, and raises TeacherError naming the spec)."""
    from transformers import AutoTokenizer

    path = Path(spec).expanduser()
    if path.is_dir() and (path / "config.json").is_file() and (path / "tokenizer_config.json").is_file():
        if trust_remote_code:
            from teachers.loading import warn_remote_code

            warn_remote_code(spec)
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    from teachers import load_teacher

    return load_teacher(spec, dtype=dtype, trust_remote_code=trust_remote_code).tokenizer


def run(ctx: StageContext) -> StageResult:
    """Tokenize, pack and split `data.sources` into ctx.stage_dir/dataset."""
    from teachers.data import prepare_corpus

    r = ctx.recipe
    tokenizer = load_tokenizer(r.teacher.spec, r.teacher.trust_remote_code, r.teacher.dtype)
    tok_dir = ctx.stage_dir / "tokenizer"
    tokenizer.save_pretrained(tok_dir)
    out = ctx.stage_dir / "dataset"
    if out.exists():  # a killed earlier attempt: start over, nothing partial is reused
        shutil.rmtree(out)
    stats = prepare_corpus(list(r.data.sources), tokenizer, out, seq_len=r.data.seq_len,
                           val_fraction=r.data.val_fraction, seed=split_seed(r), separator=r.data.separator,
                           text_field=r.data.text_field, max_tokens=r.data.max_train_tokens,
                           max_bytes=r.data.max_train_bytes)
    ctx.log.info("prepare: %s", ", ".join(f"{k}={v}" for k, v in stats.items() if isinstance(v, (int, float))))
    return StageResult(outputs={"dataset": str(out), "tokenizer": str(tok_dir)}, metrics=dict(stats))
