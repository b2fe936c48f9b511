"""What the training stages (align, distill) build from a recipe, and how they train and save it.

The student (a fresh SpikeGPT or matched Llama, optionally initialised from the teacher:
`student.init_from_teacher`, see pipeline.inherit), the frozen stage teacher, the SpAD module, the datasets of
the prepare stage, the fit (freeze what no loss reaches, then the Trainer) and the saved outputs. Stages import
from here, never from each other. SPIKEDISTILL_TENSORBOARD=1 also writes TensorBoard logs to
<stage>/tensorboard (needs `pip install tensorboard`).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import ConfigError
from pipeline.losses import FEATURE_TERMS, DistillObjective, SpADLoss, SpADTargetSpec, lif_kwargs
from pipeline.stages import StageContext
from pipeline.trainer import Trainer, freeze_unreached_parameters

PROJECTIONS = "projections.safetensors"
LOG = logging.getLogger(__name__)


def stage_vocab(ctx: StageContext, teacher: Any) -> Any:
    """The teachers.vocab.VocabMap between the teacher's tokenizer and the student tokenizer the prepare stage
    saved, or None for student.vocab=teacher. Exact teacher targets over the student's vocabulary
    (teachers.subvocab) read its pieces."""
    from transformers import AutoTokenizer

    from teachers.vocab import VocabMap, parse_vocab

    spec = parse_vocab(ctx.recipe.student.vocab)
    if spec.is_teacher:
        return None
    student = AutoTokenizer.from_pretrained(ctx.upstream["prepare"]["outputs"]["tokenizer"])
    return VocabMap.build(teacher.tokenizer, student, spec)


def student_vocabulary(ctx: StageContext, teacher: Any = None) -> tuple[int, torch.Tensor | None]:
    """(vocabulary size, teacher ids or None) of the student a training stage builds.

    student.vocab=teacher: the teacher's logit width (needs `teacher`) and None. A derived vocabulary: the
    size of the tokenizer the prepare stage saved, and with a `teacher` the teacher id of each of its tokens
    (LongTensor [V_s], -1 for bytes the teacher lacks; teachers.vocab.teacher_ids), for weight inheritance."""
    from transformers import AutoTokenizer

    from teachers.vocab import parse_vocab, teacher_ids

    if parse_vocab(ctx.recipe.student.vocab).is_teacher:
        return teacher.vocab_size, None
    tokenizer = AutoTokenizer.from_pretrained(ctx.upstream["prepare"]["outputs"]["tokenizer"])
    return len(tokenizer), (teacher_ids(teacher.tokenizer, tokenizer) if teacher is not None else None)


def build_student(recipe: Any, vocab_size: int, teacher: Any = None, log: Any = None,
                  teacher_ids: torch.Tensor | None = None):
    """A fresh student from student.preset + student.config, with the student's vocab size: a
    SpikeGPTForCausalLM, or with student.arch=llama the matched non-spiking LlamaForCausalLM baseline.

    With student.init_from_teacher (either arch) its embedding and LM head start from the teacher's
    (pipeline.inherit); that needs `teacher` (a teachers.Teacher), else StageError. teacher_ids (LongTensor
    [vocab_size], -1 for none): for a vocabulary derived from the teacher's, the teacher token of each student
    token, whose rows the student inherits (see student_vocabulary)."""
    from pipeline.recipe import student_config
    from students import SpikeGPTForCausalLM, matched_llama

    config = student_config(recipe, vocab_size)
    if config.max_position and recipe.data.seq_len > config.max_position:
        raise ConfigError(f"data.seq_len: {recipe.data.seq_len} exceeds the student's max_position "
                          f"{config.max_position}; lower data.seq_len or raise student.config.max_position")
    torch.manual_seed(recipe.run.seed)  # identical initial weights on every rank and every rerun
    if recipe.student.arch == "llama":
        student = matched_llama(config, max(recipe.data.seq_len, recipe.evaluate.context_length, 2048))
    else:
        student = SpikeGPTForCausalLM(config)
    if recipe.student.init_from_teacher:
        from pipeline.errors import StageError
        from pipeline.inherit import init_student_from_teacher, teacher_projections

        if teacher is None:
            raise StageError("student.init_from_teacher needs the teacher loaded where the student is built")
        stats = init_student_from_teacher(student, teacher_projections(teacher, config.d_model, recipe.run.seed),
                                          teacher_ids)
        (log or LOG).info("student: embedding and LM head from the teacher's embedding projection (%s)",
                          ", ".join(f"{k} {v:.3f}" for k, v in stats.items()))
    return student


def load_stage_teacher(recipe: Any, accelerator: Any, attn_maps: bool):
    """The frozen teacher in the recipe's dtype on the accelerator's device, whole on every rank."""
    from pipeline.stages.teacher_cache import teacher_dtype
    from students.ops.threads import watch
    from teachers import load_teacher

    with _unpartitioned(accelerator):
        teacher = load_teacher(recipe.teacher.spec, dtype=teacher_dtype(recipe.teacher.dtype), attn_maps=attn_maps,
                               device=accelerator.device, trust_remote_code=recipe.teacher.trust_remote_code)
    watch(teacher.model)  # the thread governor re-decides between teacher forwards too
    return teacher


@contextmanager
def _unpartitioned(accelerator: Any):
    """Load models whole under DeepSpeed ZeRO-3, where transformers would partition them (zero.Init).

    transformers decides from the DeepSpeed config that accelerate registers (its stage, not accelerate's
    zero3_init flag), so that registration is lifted for the duration and restored afterwards.
    """
    plugin = getattr(accelerator.state, "deepspeed_plugin", None)
    if plugin is None:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def spad_target_spec(recipe: Any, config: Any, teacher: Any, weights: dict[str, float]) -> SpADTargetSpec:
    """What the feature terms with weight > 0 read from the teacher (pipeline.losses.SpADTargetSpec) for a
    student of `config` (its n_layer, n_head): the layer map (teacher.layer_map overrides, logged), the head
    mapping and sfa_target_norm of the align section. `teacher`: a teachers.Teacher or any object with its
    num_layers and num_heads."""
    from teachers import layer_map

    mapping = layer_map(config.n_layer, teacher.num_layers, dict(recipe.teacher.layer_map))  # logs the map
    return SpADTargetSpec(tuple(mapping), tuple(k for k in FEATURE_TERMS if weights[k] > 0),
                          recipe.align.head_mapping, config.n_head, teacher.num_heads, recipe.align.sfa_target_norm)


def build_spad(recipe: Any, student, teacher, weights: dict[str, float], log) -> SpADLoss | None:
    """SpADLoss for the feature terms with weight > 0 (None when all three are 0); logs the layer map.

    teacher: a teachers.Teacher, or with feature targets from the cache a `TeacherShape` (its num_layers,
    hidden_size, num_heads); the EA projection's inheritance (student.init_from_teacher) needs the Teacher."""
    if not any(weights[k] > 0 for k in FEATURE_TERMS):
        return None
    cfg = student.config
    spec = spad_target_spec(recipe, cfg, teacher, weights)
    spad = spad_module(recipe, cfg, list(spec.layer_map), teacher.hidden_size, teacher.num_heads, weights)
    if recipe.student.init_from_teacher and weights["ea"] > 0:
        from pipeline.inherit import init_ea_projection

        explained = init_ea_projection(spad.ea_proj, student, teacher.model.get_input_embeddings().weight)
        log.info("SpAD: EA projection = least-squares decoder of the student's embedding (R^2 %.3f)", explained)
    return spad


@dataclass(frozen=True)
class TeacherShape:
    """The sizes of a teacher that the SpAD projections and layer map need, without its weights (the
    teacher_cache stage records them as its metric "teacher_shape")."""

    num_layers: int
    hidden_size: int
    num_heads: int


def spad_module(recipe: Any, cfg: Any, mapping: list[int], teacher_hidden: int, teacher_heads: int,
                weights: dict[str, float]) -> SpADLoss:
    """The SpADLoss of a student config and a teacher's width and heads, for the layer map `mapping`
    (student layer -> teacher layer)."""
    return SpADLoss(student_dim=cfg.d_model, teacher_dim=teacher_hidden, layer_map=mapping,
                    student_heads=cfg.n_head, teacher_heads=teacher_heads, weights=weights,
                    head_mapping=recipe.align.head_mapping, lif=lif_kwargs(cfg), time_steps=cfg.time_steps,
                    sfa_target_norm=recipe.align.sfa_target_norm)


def datasets(ctx: StageContext):
    """(train, val) TokenDatasets of the prepare stage; val is None when the split is empty."""
    from teachers.data import TokenDataset

    path = ctx.upstream["prepare"]["outputs"]["dataset"]
    train, val = TokenDataset(path, "train"), TokenDataset(path, "val")
    return train, (val if len(val) else None)


def probe_batch(train, batch_size: int, collate) -> dict[str, torch.Tensor]:
    """The first rows of the training split, to find parameters no loss term reaches."""
    return collate([train[i] for i in range(min(batch_size, len(train)))])


def save_outputs(ctx: StageContext, trainer: Trainer, objective: DistillObjective) -> dict[str, str]:
    """Main process: student -> stage_dir/student (HF), SpAD projections -> stage_dir/projections.safetensors."""
    from safetensors.torch import save_file

    state = trainer.full_state_dict()  # collective under FSDP / ZeRO-3: every rank calls it
    outputs = {"student": str(ctx.stage_dir / "student")}
    if objective.spad is not None:
        outputs["projections"] = str(ctx.stage_dir / PROJECTIONS)
    if ctx.is_main:
        student_sd = {k.removeprefix("student."): v for k, v in state.items() if k.startswith("student.")}
        objective.student.save_pretrained(outputs["student"], state_dict=student_sd, safe_serialization=True)
        if objective.spad is not None:
            spad_sd = {k.removeprefix("spad."): v.contiguous() for k, v in state.items() if k.startswith("spad.")}
            save_file(spad_sd, outputs["projections"])
    ctx.accelerator.wait_for_everyone()
    return outputs


def train_objective(ctx: StageContext, objective: DistillObjective, section: Any, name: str, train, val,
                    collate=None) -> tuple[Trainer, dict]:
    """Freeze what no loss reaches, then fit with the section's train settings; returns (trainer, metrics).

    Both stages order the data by run.seed; align reads that order from its end (Trainer from_end), so distill
    reads the rows of a run without align, in the same order, and align's rows are ones distill reaches last
    (none of them while align + distill rows fit in one pass over the split)."""
    from pipeline.runner import stage_config_hash
    from pipeline.trainer import default_collate

    collate = collate or default_collate
    objective.to(ctx.accelerator.device)
    frozen = freeze_unreached_parameters(objective, probe_batch(train, section.train.batch_size, collate))
    if frozen:
        ctx.log.info("%s: %d parameters get no gradient from the weighted terms and are frozen (e.g. %s)", name,
                     len(frozen), frozen[0])
    trainer = Trainer(objective, section.train, ctx.accelerator, ctx.stage_dir, train, val_data=val,
                      bytes_per_token=train.bytes_per_token, seed=ctx.recipe.run.seed,
                      config_hash=stage_config_hash(ctx.recipe, name), name=name, collate=collate,
                      fsdp=ctx.recipe.distributed.strategy == "fsdp", accept_hashes=ctx.accept_checkpoints,
                      tensorboard=os.environ.get("SPIKEDISTILL_TENSORBOARD", "0") == "1", from_end=name == "align")
    return trainer, trainer.fit()


def load_projections(spad: SpADLoss, path: str | Path, log) -> None:
    """Copy align's projections into `spad` where names and shapes match (terms align did not train stay fresh)."""
    from safetensors.torch import load_file

    saved = load_file(str(path))
    own = spad.state_dict()
    taken = {k: v for k, v in saved.items() if k in own and own[k].shape == v.shape}
    spad.load_state_dict(taken, strict=False)
    log.info("distill: %d of %d SpAD tensors start from align's projections", len(taken), len(own))
