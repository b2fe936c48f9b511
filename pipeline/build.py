"""What the training stages (align, distill) build from a recipe, and how they train and save it.

The student (a fresh SpikeGPT, optionally initialised from the teacher: `student.init_from_teacher`, see
pipeline.inherit), the frozen stage teacher, the SpAD module, the datasets of the prepare stage, the fit
(freeze what no loss reaches, then the Trainer) and the saved outputs. Stages import from here, never from
each other. SPIKEDISTILL_TENSORBOARD=1 also writes TensorBoard logs to <stage>/tensorboard (needs
`pip install tensorboard`).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import ConfigError
from pipeline.losses import DistillObjective, SpADLoss, lif_kwargs
from pipeline.stages import StageContext
from pipeline.trainer import Trainer, freeze_unreached_parameters

PROJECTIONS = "projections.safetensors"
LOG = logging.getLogger(__name__)


def build_student(recipe: Any, vocab_size: int, teacher: Any = None, log: Any = None):
    """A fresh student from student.preset + student.config, with the teacher's vocab size: a
    SpikeGPTForCausalLM, or with student.arch=llama the matched non-spiking LlamaForCausalLM baseline.

    With student.init_from_teacher its embedding and LM head start from the teacher's (pipeline.inherit);
    that needs `teacher` (a teachers.Teacher), else StageError."""
    from pipeline.recipe import student_config
    from students import SpikeGPTForCausalLM, matched_llama

    config = student_config(recipe, vocab_size)
    if config.max_position and recipe.data.seq_len > config.max_position:
        raise ConfigError(f"data.seq_len: {recipe.data.seq_len} exceeds the student's max_position "
                          f"{config.max_position}; lower data.seq_len or raise student.config.max_position")
    torch.manual_seed(recipe.run.seed)  # identical initial weights on every rank and every rerun
    if recipe.student.arch == "llama":
        positions = max(recipe.data.seq_len, recipe.evaluate.context_length, 2048)
        return matched_llama(config, positions)
    student = SpikeGPTForCausalLM(config)
    if recipe.student.init_from_teacher:
        from pipeline.errors import StageError
        from pipeline.inherit import init_student_from_teacher, teacher_projections

        if teacher is None:
            raise StageError("student.init_from_teacher needs the teacher loaded where the student is built")
        stats = init_student_from_teacher(student, teacher_projections(teacher, config.d_model, recipe.run.seed))
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


def build_spad(recipe: Any, student, teacher, weights: dict[str, float], log) -> SpADLoss | None:
    """SpADLoss for the feature terms with weight > 0 (None when all three are 0); logs the layer map."""
    from teachers import layer_map

    if not any(weights[k] > 0 for k in ("ea", "saa", "sfa")):
        return None
    cfg = student.config
    mapping = layer_map(cfg.n_layer, teacher.num_layers, dict(recipe.teacher.layer_map))  # logs the map
    spad = spad_module(recipe, cfg, mapping, teacher.hidden_size, teacher.num_heads, weights)
    if recipe.student.init_from_teacher and weights["ea"] > 0:
        from pipeline.inherit import init_ea_projection

        explained = init_ea_projection(spad.ea_proj, student, teacher.model.get_input_embeddings().weight)
        log.info("SpAD: EA projection = least-squares decoder of the student's embedding (R^2 %.3f)", explained)
    return spad


def spad_module(recipe: Any, cfg: Any, mapping: list[int], teacher_hidden: int, teacher_heads: int,
                weights: dict[str, float]) -> SpADLoss:
    """The SpADLoss of a student config and a teacher's width and heads, for the layer map `mapping`."""
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
    """Freeze what no loss reaches, then fit with the section's train settings; returns (trainer, metrics)."""
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
                      tensorboard=os.environ.get("SPIKEDISTILL_TENSORBOARD", "0") == "1")
    return trainer, trainer.fit()


def load_projections(spad: SpADLoss, path: str | Path, log) -> None:
    """Copy align's projections into `spad` where names and shapes match (terms align did not train stay fresh)."""
    from safetensors.torch import load_file

    saved = load_file(str(path))
    own = spad.state_dict()
    taken = {k: v for k, v in saved.items() if k in own and own[k].shape == v.shape}
    spad.load_state_dict(taken, strict=False)
    log.info("distill: %d of %d SpAD tensors start from align's projections", len(taken), len(own))
