"""Stage registry and the stage contract.

A stage is a module `pipeline/stages/<name>.py` with ``run(ctx: StageContext) -> StageResult``. Its
``StageSpec`` says which recipe sections its config hash covers and which earlier stages it reads, so the
runner can decide skip / rerun and refuse a stage whose input stage has not run.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.schema import Recipe

STAGE_ORDER = ("prepare", "teacher_cache", "align", "distill", "export", "evaluate")
TRAINING_STAGES = ("align", "distill")


@dataclass
class StageResult:
    """What a stage hands back: named output paths for later stages, and its metrics (JSON-able)."""

    outputs: dict[str, str]
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageContext:
    """Everything a stage may use. `upstream` maps an input stage's name to its done.json dict;
    `accept_checkpoints`: config hashes, besides the stage's own, whose checkpoints a training stage resumes
    from (set by `spikedistill run --extend`)."""

    recipe: Recipe
    run_dir: Path
    stage_dir: Path
    upstream: dict[str, dict]
    accelerator: Any
    is_main: bool
    log: logging.Logger
    accept_checkpoints: tuple[str, ...] = ()


StageFn = Callable[[StageContext], StageResult]


def _uses_cache(r: Recipe) -> bool:
    return r.teacher_cache.enabled and r.distill.use_teacher_cache


@dataclass(frozen=True)
class StageSpec:
    """How the runner treats one stage.

    sections(recipe) -> the recipe parts its config hash covers (besides its inputs' hashes);
    needs(recipe) -> the earlier stages whose outputs it reads; enabled(recipe) -> part of a full run.
    """

    name: str
    sections: Callable[[Recipe], dict[str, Any]]
    needs: Callable[[Recipe], tuple[str, ...]]
    enabled: Callable[[Recipe], bool] = lambda r: True
    training: bool = False


def split_seed(r: Recipe) -> int:
    """The seed of the train/validation split: data.split_seed, else run.seed."""
    return r.run.seed if r.data.split_seed is None else r.data.split_seed


def _prepare_sections(r: Recipe) -> dict[str, Any]:
    # the tokenizer is the teacher's or derived from it (student.vocab), and the split is seeded: nothing else
    # changes the dataset. student.vocab enters only when it is not the default, so that the hashes of runs
    # made before it existed still match
    sections = {"data": r.data, "teacher.spec": r.teacher.spec,
                "teacher.trust_remote_code": r.teacher.trust_remote_code, "split_seed": split_seed(r)}
    if r.student.vocab != "teacher":
        sections["student.vocab"] = r.student.vocab
    return sections


def _cache_sections(r: Recipe) -> dict[str, Any]:
    # the cache holds the teacher at the distillation temperature (teachers.cache): another tau, another cache
    cache = asdict(r.teacher_cache)
    if cache["branch_floor"] == 0 or r.student.vocab == "teacher":
        del cache["branch_floor"]  # exact (or unused): the hash a cache had before the key existed
    sections = {"teacher_cache": cache, "teacher": r.teacher, "distill.kd.temperature": r.distill.kd.temperature}
    if cache["store"] == "topk":
        del cache["store"]  # the default: the hash a cache had before the key existed
    else:  # the hidden store keeps no top-k and no temperature: one cache serves every k and tau
        del cache["k"], sections["distill.kd.temperature"]
    if not r.teacher_cache.features:
        del cache["features"]  # so that a logit cache keeps the hash it had before the key existed
        return sections
    # the feature targets depend on the terms, the student's layer and head counts (the layer map, the mapped
    # heads) and two align settings (teacher.layer_map is in "teacher")
    w = r.distill.weights
    sections["features"] = {"terms": [k for k in ("ea", "saa", "sfa") if getattr(w, k) > 0],
                            "student.preset": r.student.preset, "student.config": r.student.config,
                            "align.head_mapping": r.align.head_mapping,
                            "align.sfa_target_norm": r.align.sfa_target_norm}
    return sections


def _train_common(r: Recipe) -> dict[str, Any]:
    # student.vocab reaches the training stages through prepare's hash (see _prepare_sections)
    student = {k: v for k, v in asdict(r.student).items() if k != "vocab"}
    return {"teacher": r.teacher, "student": student, "run.seed": r.run.seed,
            "distributed.mixed_precision": r.distributed.mixed_precision}


def _align_sections(r: Recipe) -> dict[str, Any]:
    return {"align": r.align, **_train_common(r)}


def _distill_sections(r: Recipe) -> dict[str, Any]:
    sections = {"distill": r.distill, "teacher_cache.enabled": _uses_cache(r), **_train_common(r)}
    if r.teacher_cache.features:  # feature targets from the cache instead of the online teacher
        sections["teacher_cache.features"] = True
    if _uses_cache(r) and r.teacher_cache.store != "topk":  # the full logits from the hidden store
        sections["teacher_cache.store"] = r.teacher_cache.store
    if r.teacher_cache.branch_floor != 0 and r.student.vocab != "teacher":  # online targets over a derived vocab
        sections["teacher_cache.branch_floor"] = r.teacher_cache.branch_floor
    w = r.distill.weights
    if w.ea > 0 or w.saa > 0 or w.sfa > 0:  # distill's own SpAD terms read these two align settings
        sections.update({"align.head_mapping": r.align.head_mapping, "align.sfa_target_norm": r.align.sfa_target_norm})
    return sections


def _distill_needs(r: Recipe) -> tuple[str, ...]:
    needs = ["prepare"]
    if _uses_cache(r):
        needs.append("teacher_cache")
    if r.align.enabled:
        needs.append("align")
    return tuple(needs)


SPECS: dict[str, StageSpec] = {
    "prepare": StageSpec("prepare", _prepare_sections, lambda r: ()),
    "teacher_cache": StageSpec("teacher_cache", _cache_sections, lambda r: ("prepare",),
                               enabled=lambda r: r.teacher_cache.enabled),
    "align": StageSpec("align", _align_sections, lambda r: ("prepare",), enabled=lambda r: r.align.enabled,
                       training=True),
    "distill": StageSpec("distill", _distill_sections, _distill_needs, training=True),
    # export also copies the tokenizer saved by prepare
    "export": StageSpec("export", lambda r: {"export": r.export}, lambda r: ("prepare", "distill")),
    # the teacher is scored too, and the model card needs the data/teacher it came from
    "evaluate": StageSpec("evaluate", lambda r: {"evaluate": r.evaluate, "teacher": r.teacher},
                          lambda r: ("export",)),
}

# name -> stage function replacing the module's run(); tests register stubs here to keep runner tests fast
_OVERRIDES: dict[str, StageFn] = {}


def register_stage(name: str, fn: StageFn | None) -> None:
    """Use `fn` as stage `name`'s run function (None restores the module's own)."""
    if name not in SPECS:
        raise KeyError(f"unknown stage {name!r}; stages are {', '.join(STAGE_ORDER)}")
    if fn is None:
        _OVERRIDES.pop(name, None)
    else:
        _OVERRIDES[name] = fn


def get_stage(name: str) -> StageFn:
    """The run function of stage `name` (imported lazily so a run loads only the stages it needs)."""
    if name in _OVERRIDES:
        return _OVERRIDES[name]
    return importlib.import_module(f"pipeline.stages.{name}").run
