"""Stage distill: soft-target KD (STA, tau^2-scaled) + hard-target CE (HTA), optional SpAD feature terms.

Starts from align's student (or a fresh one when align.enabled is false). With a student vocabulary derived
from the teacher's (student.vocab = subset:N | bytes) only the hard-target term trains for now (see
pipeline.build.subvocab_targets_unavailable); the teacher is then loaded only for weight inheritance. Soft targets come from the
online teacher (its logits made chunk by chunk from its last hidden state) or, with teacher_cache.enabled
and distill.use_teacher_cache, from the cached sparse top-k targets (k tokens + one tail bucket; see
pipeline.losses.kd_loss) so the teacher is not loaded at all unless a feature term needs it. With the
cache, validation rows have no cached targets: val metrics are CE (HTA) only.
Output: {"student": dir (HF save_pretrained)} (+ "projections" when feature terms are on).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import torch
from torch.utils.data import Dataset

from pipeline.build import (
    build_spad,
    build_student,
    datasets,
    load_projections,
    load_stage_teacher,
    save_outputs,
    student_vocabulary,
    subvocab_targets_unavailable,
    train_objective,
)
from pipeline.losses import DistillObjective
from pipeline.stages import StageContext, StageResult


class CachedRows(Dataset):
    """Training rows paired with their cached teacher targets: {"input_ids": [L], "targets": SparseTargets}."""

    def __init__(self, rows: Dataset, cache: Any):
        if len(cache) != len(rows):
            from pipeline.errors import StageError

            raise StageError(f"{cache.dir}: cache has {len(cache)} rows, the dataset {len(rows)}; rerun the "
                             "teacher_cache stage")
        self.rows, self.cache = rows, cache
        self.bytes_per_token = rows.bytes_per_token

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.rows[i], "targets": self.cache[i]}


def collate_cached(items: list[dict]) -> dict:
    """Batch CachedRows items: input_ids [B, L] and SparseTargets [B, L, k]."""
    from teachers.cache import SparseTargets

    return {"input_ids": torch.stack([x["input_ids"] for x in items]),
            "targets": SparseTargets.stack([x["targets"] for x in items])}


def _open_cache(ctx: StageContext, train) -> Any:
    from teachers.cache import TeacherCache

    r = ctx.recipe
    expect = {"data_hash": train.data_hash, "seq_len": train.seq_len, "k": r.teacher_cache.k,
              "value_dtype": r.teacher_cache.value_dtype, "tokenizer_hash": train.meta["tokenizer_hash"]}
    # the teacher is not loaded here; the cache must at least be the one its stage built and recorded
    built_by = ctx.upstream["teacher_cache"].get("metrics", {}).get("teacher_fingerprint")
    if built_by:
        expect["teacher_fingerprint"] = built_by
    return TeacherCache(ctx.upstream["teacher_cache"]["outputs"]["cache"], expect=expect)


def _student(ctx: StageContext, teacher) -> Any:
    if "align" in ctx.upstream:
        from students import SpikeGPTForCausalLM

        path = ctx.upstream["align"]["outputs"]["student"]
        ctx.log.info("distill: starting from align's student %s", path)
        return SpikeGPTForCausalLM.from_pretrained(path)
    vocab_size, teacher_ids = student_vocabulary(ctx, teacher)
    return build_student(ctx.recipe, vocab_size, teacher, ctx.log, teacher_ids)


def _needs_teacher(ctx: StageContext, features: bool, use_cache: bool, derived: bool) -> bool:
    """Whether distill loads the teacher: for feature terms, online soft targets or a fresh student with the
    teacher's vocabulary (its size is the teacher's logit width) or inherited weights. A derived vocabulary
    (CE only until exact targets exist, see subvocab_targets_unavailable) needs it for inheritance alone."""
    fresh = "align" not in ctx.upstream
    if derived:
        return fresh and ctx.recipe.student.init_from_teacher
    return features or not use_cache or fresh


def run(ctx: StageContext) -> StageResult:
    """Distill the teacher's output distribution into the student."""
    from teachers.vocab import parse_vocab

    r = ctx.recipe
    weights = asdict(r.distill.weights)
    use_cache = "teacher_cache" in ctx.upstream
    features = any(weights[k] > 0 for k in ("ea", "saa", "sfa"))
    derived = not parse_vocab(r.student.vocab).is_teacher
    if derived:
        subvocab_targets_unavailable(r)
    needs_teacher = _needs_teacher(ctx, features, use_cache, derived)
    teacher = load_stage_teacher(r, ctx.accelerator, attn_maps=weights["saa"] > 0) if needs_teacher else None
    student = _student(ctx, teacher)
    if teacher is not None and not derived:
        from teachers import check_vocab

        check_vocab(student.config.vocab_size, teacher)
    spad = build_spad(r, student, teacher, weights, ctx.log) if features else None
    if spad is not None and "projections" in ctx.upstream.get("align", {}).get("outputs", {}):
        load_projections(spad, ctx.upstream["align"]["outputs"]["projections"], ctx.log)
    kd = {"kind": r.distill.kd.kind, "temperature": r.distill.kd.temperature, "beta": r.distill.kd.jsd_beta,
          "chunk_size": r.distill.kd.chunk_size, "impl": r.distill.kd.impl}
    online = teacher if (features or not use_cache) and not derived else None
    objective = DistillObjective(student, weights, teacher=online, spad=spad, kd=kd)
    train, val = datasets(ctx)
    collate = None
    if use_cache:
        train, collate = CachedRows(train, _open_cache(ctx, train)), collate_cached
        ctx.log.info("distill: soft targets from the teacher cache (k=%d)", r.teacher_cache.k)
    trainer, metrics = _fit(ctx, objective, train, val, collate)
    return StageResult(outputs=save_outputs(ctx, trainer, objective), metrics=metrics)


def _fit(ctx: StageContext, objective: DistillObjective, train, val, collate):
    if collate is None:
        return train_objective(ctx, objective, ctx.recipe.distill, "distill", train, val)
    from pipeline.trainer import default_collate

    def mixed(items):  # training rows carry targets, validation rows are plain token tensors
        return collate(items) if isinstance(items[0], dict) else default_collate(items)

    return train_objective(ctx, objective, ctx.recipe.distill, "distill", train, val, collate=mixed)
