"""Stage prepare: tokenize the corpus with the teacher's tokenizer, pack rows of seq_len, split, memory-map.

Outputs: {"dataset": dir (teachers.data format: train.bin, val.bin, meta.json), "tokenizer": dir (the
teacher's tokenizer, saved so later stages load it without loading the teacher)}.
`data.max_train_tokens` keeps only the first tokens of the sources, in source order ("bundled" = the bundled
training texts, Austen first).
"""

from __future__ import annotations

import shutil
from pathlib import Path

from pipeline.stages import StageContext, StageResult


def load_tokenizer(spec: str, trust_remote_code: bool = False, dtype: str = "bf16"):
    """The teacher's tokenizer, without loading its weights when the spec is a hub id or a HF directory."""
    from transformers import AutoTokenizer

    path = Path(spec)
    is_hf_dir = path.is_dir() and any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json"))
    is_hub_id = "/" in spec and not path.exists() and not spec.endswith(".gguf")
    if is_hf_dir or is_hub_id:
        return AutoTokenizer.from_pretrained(spec, trust_remote_code=trust_remote_code)
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
                           val_fraction=r.data.val_fraction, seed=r.run.seed, separator=r.data.separator,
                           text_field=r.data.text_field, max_tokens=r.data.max_train_tokens)
    ctx.log.info("prepare: %s", ", ".join(f"{k}={v}" for k, v in stats.items() if isinstance(v, (int, float))))
    return StageResult(outputs={"dataset": str(out), "tokenizer": str(tok_dir)}, metrics=dict(stats))
