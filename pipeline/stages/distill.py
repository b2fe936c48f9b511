"""Stage distill: soft-target KD (STA, tau^2-scaled) + hard-target CE (HTA), optional SpAD feature terms.

Starts from align's student (or a fresh one when align.enabled is false). Soft targets come from the
online teacher (its logits made chunk by chunk from its last hidden state) or, with teacher_cache.enabled
and distill.use_teacher_cache, from the cached sparse top-k targets of the teacher at distill.kd.temperature
(k tokens + one tail bucket; see pipeline.losses.kd_loss; a cache of another temperature is refused) so the
teacher is not loaded at all unless a feature term needs it. With teacher_cache.store=hidden the cache holds
the teacher's last hidden states and head instead, and the loss recomputes its full logits (exact at any tau).
With the cache, validation rows have no cached targets: val metrics are CE (HTA) only, or with an online
teacher loaded for feature terms, KD on its full-vocabulary logits.
Feature weights (distill.weights.ea / saa / sfa > 0) train the SpAD terms at every step together with STA and
HTA, BiSpikCLM's joint objective: the online teacher gives their targets (attention maps when saa > 0), or
with teacher_cache.features the feature cache the teacher_cache stage built (teachers.feature_cache), read
beside the top-k targets, so the teacher is never run (it is loaded only, as for cached KD, to size a fresh
student); their projections start from align's when it ran, and STA still reads the cache when it is enabled.
With the feature cache, validation rows have no feature targets either: val metrics are CE only.
With a student vocabulary derived from the teacher's (student.vocab = subset:N | bytes) the soft targets are
the teacher's exact distributions over the student's vocabulary (teachers.subvocab): cached like any others,
or online from each row's teacher view (train and validation rows carry their views, ViewRows).
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
    stage_vocab,
    student_vocabulary,
    train_objective,
)
from pipeline.losses import FEATURE_TERMS, DistillObjective, SpADTargets
from pipeline.stages import StageContext, StageResult


class CachedRows(Dataset):
    """Training rows paired with their cached teacher targets: {"input_ids": [L], "targets": SparseTargets
    [L, k]}, plus "features" (teachers.feature_cache.FeatureCache row: {name: tensor}) with a feature cache."""

    def __init__(self, rows: Dataset, cache: Any, features: Any = None):
        for c in (cache, features):
            if c is not None and len(c) != len(rows):
                from pipeline.errors import StageError

                raise StageError(f"{c.dir}: cache has {len(c)} rows, the dataset {len(rows)}; rerun the "
                                 "teacher_cache stage")
        self.rows, self.cache, self.features = rows, cache, features
        self.bytes_per_token = rows.bytes_per_token

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        item = {"input_ids": self.rows[i], "targets": self.cache[i]}
        if self.features is not None:
            item["features"] = self.features[i]
        return item


def collate_cached(items: list[dict]) -> dict:
    """Batch CachedRows items: input_ids [B, L], SparseTargets [B, L, k] (or, from a hidden store,
    HiddenTargets [B, L, C_t]) and, with a feature cache, SpADTargets."""
    batch = {"input_ids": torch.stack([x["input_ids"] for x in items]),
             "targets": type(items[0]["targets"]).stack([x["targets"] for x in items])}
    if "features" in items[0]:
        batch["features"] = SpADTargets.from_tensors({name: torch.stack([x["features"][name] for x in items])
                                                      for name in items[0]["features"]})
    return batch


class ViewRows(Dataset):
    """Rows paired with their teacher views, for online exact targets over a derived student vocabulary:
    {"input_ids": [L], "views": teachers.data.TeacherView}."""

    def __init__(self, rows: Dataset):
        self.rows, self.bytes_per_token = rows, rows.bytes_per_token

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.rows[i], "views": self.rows.teacher_view(i)}


class ViewBatch(list):
    """The teacher views of a batch's rows (ragged, one TeacherView per row). The trainer moves batch values
    with .to(device); views stay on the CPU (the teacher moves the ids it runs)."""

    def to(self, device) -> ViewBatch:
        return self


def collate_views(items: list[dict]) -> dict:
    """Batch ViewRows items: input_ids [B, L] and a ViewBatch of B views."""
    return {"input_ids": torch.stack([x["input_ids"] for x in items]),
            "views": ViewBatch(x["views"] for x in items)}


def _open_cache(ctx: StageContext, train) -> Any:
    """The teacher_cache stage's cache, checked against this run's data and recipe: a TeacherCache (top-k) or,
    with teacher_cache.store=hidden, a HiddenCache (temperature-free)."""
    from teachers.cache import HiddenCache, TeacherCache, vocab_key

    r = ctx.recipe
    expect = {"data_hash": train.data_hash, "seq_len": train.seq_len, "value_dtype": r.teacher_cache.value_dtype,
              "tokenizer_hash": train.meta["tokenizer_hash"]}
    # the teacher is not loaded here; the cache must at least be the one its stage built and recorded
    built_by = ctx.upstream["teacher_cache"].get("metrics", {}).get("teacher_fingerprint")
    if built_by:
        expect["teacher_fingerprint"] = built_by
    path = ctx.upstream["teacher_cache"]["outputs"]["cache"]
    if r.teacher_cache.store == "hidden":
        return HiddenCache(path, expect=expect)
    expect.update(k=r.teacher_cache.k, temperature=float(r.distill.kd.temperature),
                  **vocab_key(train.meta, r.teacher_cache.branch_floor))
    return TeacherCache(path, expect=expect)


def _open_features(ctx: StageContext, train, spad: Any, sizes: Any) -> Any:
    """The feature cache of the teacher_cache stage, checked against the targets `spad` reads (sizes: the
    teacher's, a Teacher or TeacherShape)."""
    from pipeline.stages.teacher_cache import teacher_dtype
    from teachers.feature_cache import FeatureCache

    r, built = ctx.recipe, ctx.upstream["teacher_cache"]
    expect = {"data_hash": train.data_hash, "seq_len": train.seq_len, "value_dtype": r.teacher_cache.value_dtype,
              "tokenizer_hash": train.meta["tokenizer_hash"],
              "teacher_fingerprint": built["metrics"]["teacher_fingerprint"],
              "teacher_dtype": str(teacher_dtype(r.teacher.dtype)).removeprefix("torch."),
              "width": sizes.hidden_size, **spad.target_spec.key()}
    return FeatureCache(built["outputs"]["features"], expect=expect)


def _shape(ctx: StageContext) -> Any:
    """The teacher's sizes as the teacher_cache stage recorded them (pipeline.build.TeacherShape)."""
    from pipeline.build import TeacherShape

    return TeacherShape(**ctx.upstream["teacher_cache"]["metrics"]["teacher_shape"])


def _student(ctx: StageContext, teacher) -> Any:
    if "align" in ctx.upstream:
        from students import SpikeGPTForCausalLM

        path = ctx.upstream["align"]["outputs"]["student"]
        ctx.log.info("distill: starting from align's student %s", path)
        return SpikeGPTForCausalLM.from_pretrained(path)
    vocab_size, teacher_ids = student_vocabulary(ctx, teacher)
    return build_student(ctx.recipe, vocab_size, teacher, ctx.log, teacher_ids)


def _needs_teacher(ctx: StageContext, features: bool, cached_features: bool, use_cache: bool, derived: bool) -> bool:
    """Whether distill loads the teacher: for feature terms (with the feature cache only for the EA projection's
    inheritance), online soft targets or a fresh student with the teacher's vocabulary (its size is the
    teacher's logit width) or inherited weights. A derived vocabulary needs it for online soft targets and
    inheritance only (its size is the student tokenizer's)."""
    r = ctx.recipe
    fresh = "align" not in ctx.upstream
    online = r.distill.weights.sta > 0 and not use_cache
    if derived:
        return online or (fresh and r.student.init_from_teacher)
    inherit_ea = cached_features and r.student.init_from_teacher and r.distill.weights.ea > 0
    return (features and not cached_features) or inherit_ea or not use_cache or fresh


def run(ctx: StageContext) -> StageResult:
    """Distill the teacher's output distribution into the student."""
    from teachers.vocab import parse_vocab

    r = ctx.recipe
    weights = asdict(r.distill.weights)
    use_cache = "teacher_cache" in ctx.upstream
    features = any(weights[k] > 0 for k in FEATURE_TERMS)
    cached_features = features and use_cache and r.teacher_cache.features
    derived = not parse_vocab(r.student.vocab).is_teacher
    needs_teacher = _needs_teacher(ctx, features, cached_features, use_cache, derived)
    teacher = load_stage_teacher(r, ctx.accelerator, attn_maps=weights["saa"] > 0 and not cached_features) \
        if needs_teacher else None
    student = _student(ctx, teacher)
    if teacher is not None and not derived:
        from teachers import check_vocab

        check_vocab(student.config.vocab_size, teacher)
    sizes = teacher if teacher is not None or not cached_features else _shape(ctx)
    spad = build_spad(r, student, sizes, weights, ctx.log) if features else None
    if spad is not None and "projections" in ctx.upstream.get("align", {}).get("outputs", {}):
        load_projections(spad, ctx.upstream["align"]["outputs"]["projections"], ctx.log)
    kd = {"kind": r.distill.kd.kind, "temperature": r.distill.kd.temperature, "beta": r.distill.kd.jsd_beta,
          "chunk_size": r.distill.kd.chunk_size, "impl": r.distill.kd.impl}
    online = teacher if (features and not cached_features) or not use_cache else None
    exact = stage_vocab(ctx, online) if derived and online is not None and weights["sta"] > 0 else None
    if derived and exact is None:
        online = None  # the teacher never reads a derived vocabulary's ids: CE only or cached targets
    objective = DistillObjective(student, weights, teacher=online, spad=spad, kd=kd, subvocab=_trie(exact),
                                 branch_floor=r.teacher_cache.branch_floor)
    train, val = datasets(ctx)
    collate = None
    if use_cache:
        feats = _open_features(ctx, train, spad, sizes) if cached_features else None
        train, collate = CachedRows(train, _open_cache(ctx, train), feats), collate_cached
        ctx.log.info("distill: soft targets from the teacher cache (%s)", f"top-{r.teacher_cache.k}"
                     if r.teacher_cache.store == "topk" else "hidden states: the full logits, recomputed")
        if feats is not None:
            ctx.log.info("distill: SpAD targets (%s) from the feature cache %s; the teacher is not run",
                         ", ".join(spad.target_spec.terms), feats.dir)
    elif exact is not None:
        train, val, collate = ViewRows(train), (ViewRows(val) if val is not None else None), collate_views
        ctx.log.info("distill: online exact teacher targets over the student's vocabulary (%s)", exact.spec)
    trainer, metrics = _fit(ctx, objective, train, val, collate)
    return StageResult(outputs=save_outputs(ctx, trainer, objective), metrics=metrics)


def _trie(vocab) -> Any:
    """The teachers.subvocab.PieceTrie of a VocabMap (None: none)."""
    if vocab is None:
        return None
    from teachers.subvocab import PieceTrie

    return PieceTrie.from_vocab(vocab)


def _fit(ctx: StageContext, objective: DistillObjective, train, val, collate):
    if collate is None:
        return train_objective(ctx, objective, ctx.recipe.distill, "distill", train, val)
    from pipeline.trainer import default_collate

    def mixed(items):  # training rows carry targets (and validation rows views), else plain token tensors
        return collate(items) if isinstance(items[0], dict) else default_collate(items)

    return train_objective(ctx, objective, ctx.recipe.distill, "distill", train, val, collate=mixed)
