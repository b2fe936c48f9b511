"""Stage prepare: tokenize the corpus with the student's tokenizer, pack rows of seq_len, split, memory-map.

The student's tokenizer is the teacher's own (student.vocab=teacher) or derived from it (subset:N | bytes,
teachers.vocab: built once and cached); with a derived one the dataset also holds the teacher's view of every
row (teachers.data.TeacherView). Outputs: {"dataset": dir (teachers.data format: train.bin, val.bin,
meta.json, ...), "tokenizer": dir (the student's tokenizer, saved so later stages and export load it without
the teacher)}. `data.max_train_tokens` keeps only the first tokens of the sources, in source order ("bundled" =
the bundled training texts, Austen first).
"""

from __future__ import annotations

import shutil

from pipeline.stages import StageContext, StageResult, split_seed


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    """The teacher's tokenizer, without its weights (teachers.loading.load_tokenizer: aliases, GGUF files,
    Hub ids and local directories; TeacherError naming the spec)."""
    from teachers.loading import load_tokenizer as teacher_tokenizer

    return teacher_tokenizer(spec, trust_remote_code)


def derive_vocabulary(recipe):
    """(the student's tokenizer, the VocabMap from the teacher's, or None for student.vocab=teacher)."""
    from teachers.vocab import VocabMap, parse_vocab, student_tokenizer

    teacher = load_tokenizer(recipe.teacher.spec, recipe.teacher.trust_remote_code)
    spec = parse_vocab(recipe.student.vocab)
    student = student_tokenizer(teacher, spec)
    return student, (None if spec.is_teacher else VocabMap.build(teacher, student, spec))


def run(ctx: StageContext) -> StageResult:
    """Tokenize, pack and split `data.sources` into ctx.stage_dir/dataset; save the student's tokenizer."""
    from teachers.data import prepare_corpus

    r = ctx.recipe
    tokenizer, vocab = derive_vocabulary(r)
    tok_dir = ctx.stage_dir / "tokenizer"
    tokenizer.save_pretrained(tok_dir)
    out = ctx.stage_dir / "dataset"
    if out.exists():  # a killed earlier attempt: start over, nothing partial is reused
        shutil.rmtree(out)
    stats = prepare_corpus(list(r.data.sources), tokenizer, out, seq_len=r.data.seq_len,
                           val_fraction=r.data.val_fraction, seed=split_seed(r), separator=r.data.separator,
                           text_field=r.data.text_field, max_tokens=r.data.max_train_tokens, vocab=vocab)
    ctx.log.info("prepare: %s", ", ".join(f"{k}={v}" for k, v in stats.items() if isinstance(v, (int, float))))
    return StageResult(outputs={"dataset": str(out), "tokenizer": str(tok_dir)}, metrics=dict(stats))
