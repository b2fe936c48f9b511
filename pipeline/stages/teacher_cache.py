"""Stage teacher_cache (optional, teacher_cache.enabled): top-k teacher log-probs for every training row.

The targets are those of the teacher at the distillation temperature tau = distill.kd.temperature, softmax(z /
tau) over the full vocabulary (teachers.cache.topk_targets), so the cached KD loss is tau^2 KL of the tempered
distributions, as online (up to the tail bucket).
Output: {"cache": dir} in teachers.cache format, keyed by teacher fingerprint, tokenizer, data, k and tau so
the distill stage refuses a cache that does not match. A killed build resumes at its first missing shard.
With teacher_cache.dir set, the cache lives in that shared directory: the first run builds it, later runs
with the same key find every shard there and only check the manifest (another key: a one-line error).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.stages import StageContext, StageResult

TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def teacher_dtype(name: str):
    """The torch dtype of a recipe dtype name (fp32 | bf16 | fp16)."""
    import torch

    return getattr(torch, TORCH_DTYPES[name])


def run(ctx: StageContext) -> StageResult:
    """Run the teacher over the prepared training split and store its top-k log-probs."""
    from pipeline.build import stage_vocab
    from students.ops.threads import watch
    from teachers import load_teacher
    from teachers.cache import build_teacher_cache

    r = ctx.recipe

    teacher = load_teacher(r.teacher.spec, dtype=teacher_dtype(r.teacher.dtype),
                           trust_remote_code=r.teacher.trust_remote_code)
    watch(teacher.model)  # the thread governor re-decides between batches
    out = Path(r.teacher_cache.dir).expanduser() if r.teacher_cache.dir else ctx.stage_dir / "cache"
    stats = build_teacher_cache(teacher, ctx.upstream["prepare"]["outputs"]["dataset"], out,
                                k=r.teacher_cache.k, batch_size=r.teacher_cache.batch_size, split="train",
                                value_dtype=r.teacher_cache.value_dtype, temperature=r.distill.kd.temperature,
                                vocab=stage_vocab(ctx, teacher))
    return StageResult(outputs={"cache": str(out)},
                       metrics={"teacher_fingerprint": teacher.fingerprint, **dict(stats)})
