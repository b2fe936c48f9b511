"""Stage teacher_cache (optional, teacher_cache.enabled): top-k teacher log-probs for every training row, and
with teacher_cache.features the teacher's targets of distill's SpAD feature terms.

The targets are those of the teacher at the distillation temperature tau = distill.kd.temperature, softmax(z /
tau) over the full vocabulary (teachers.cache.topk_targets), so the cached KD loss is tau^2 KL of the tempered
distributions, as online (up to the tail bucket).
Output: {"cache": dir} in teachers.cache format, keyed by teacher fingerprint, tokenizer, data, k and tau so
the distill stage refuses a cache that does not match. A killed build resumes at its first missing shard.
With teacher_cache.store=hidden the cache keeps the teacher's last hidden states and its LM head instead
(teachers.cache.build_hidden_cache), keyed without k or tau: distill recomputes the full logits, exact at any
temperature and KD kind.
With teacher_cache.dir set, the cache lives in that shared directory: the first run builds it, later runs
with the same key find every shard there and only check the manifest (another key: a one-line error).
With teacher_cache.features, also {"features": <cache dir>/features} in teachers.feature_cache format: what
SpADLoss reads from the teacher for distill's weighted feature terms (pipeline.losses.SpADTargetSpec, made by
the same code as online), keyed by what it depends on (layer map, head mapping and mapped head count,
sfa_target_norm, ...). Runs without the key never build or read it, so arms with and without feature terms
share one directory. The teacher's sizes go into the metrics (`teacher_shape`), so that distill can build
its SpAD projections without loading the teacher.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from pipeline.stages import StageContext, StageResult

TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
FEATURES_DIR = "features"


def teacher_dtype(name: str):
    """The torch dtype of a recipe dtype name (fp32 | bf16 | fp16)."""
    import torch

    return getattr(torch, TORCH_DTYPES[name])


def _load(r, attn_maps: bool):
    from students.ops.threads import watch
    from teachers import load_teacher

    teacher = load_teacher(r.teacher.spec, dtype=teacher_dtype(r.teacher.dtype), attn_maps=attn_maps,
                           trust_remote_code=r.teacher.trust_remote_code)
    watch(teacher.model)  # the thread governor re-decides between batches
    return teacher


def run(ctx: StageContext) -> StageResult:
    """Run the teacher over the prepared training split and store its top-k log-probs (and feature targets)."""
    from pipeline.build import stage_vocab
    from teachers.cache import build_teacher_cache

    r = ctx.recipe
    teacher = _load(r, attn_maps=False)
    out = Path(r.teacher_cache.dir).expanduser() if r.teacher_cache.dir else ctx.stage_dir / "cache"
    dataset = ctx.upstream["prepare"]["outputs"]["dataset"]
    stats = build_teacher_cache(teacher, dataset, out, k=r.teacher_cache.k, batch_size=r.teacher_cache.batch_size,
                                split="train", value_dtype=r.teacher_cache.value_dtype,
                                temperature=r.distill.kd.temperature, vocab=stage_vocab(ctx, teacher),
                                branch_floor=r.teacher_cache.branch_floor, store=r.teacher_cache.store)
    outputs = {"cache": str(out)}
    metrics = {"teacher_fingerprint": teacher.fingerprint, **dict(stats)}
    if r.teacher_cache.features:
        outputs["features"] = str(out / FEATURES_DIR)
        metrics["features"] = build_features(r, teacher, dataset, out / FEATURES_DIR)
        metrics["teacher_shape"] = {"num_layers": teacher.num_layers, "hidden_size": teacher.hidden_size,
                                    "num_heads": teacher.num_heads}
    return StageResult(outputs=outputs, metrics=metrics)


def build_features(r, teacher, dataset: str, out: Path, progress: bool = True) -> dict:
    """Build (or resume, or find complete) the feature cache of recipe `r`'s distill feature terms in `out`;
    `teacher` is reloaded with attention maps (eager attention, as online SAA runs it) when SAA is weighted.
    Returns teachers.feature_cache.build_feature_cache's stats."""
    from pipeline.build import spad_target_spec
    from pipeline.recipe import student_config
    from teachers.feature_cache import build_feature_cache

    spec = spad_target_spec(r, student_config(r, teacher.vocab_size), teacher, asdict(r.distill.weights))
    if "saa" in spec.terms and not teacher.attn_maps:
        teacher = _load(r, attn_maps=True)

    def targets(teacher_out):
        length = teacher_out.embeddings.shape[1]
        return spec.extract(teacher_out, length, length).tensors()

    return build_feature_cache(teacher, dataset, out, targets, spec.key(), batch_size=r.teacher_cache.batch_size,
                               value_dtype=r.teacher_cache.value_dtype, progress=progress)
