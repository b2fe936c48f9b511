"""Stage align: SpAD alignment of a fresh spiking student to the teacher (EA + SAA + SFA by default).

Builds the student from student.preset / student.config with the teacher's vocabulary (initialised from the
teacher with student.init_from_teacher), runs the teacher with attention maps, and trains the student together
with the SpAD projections (align.weights). Outputs: {"student": dir (HF save_pretrained), "projections":
safetensors file of the SpAD projections}; the projections belong to the run, not to the student, and are
dropped at export. It reads the run's data order from its end, so distill's rows do not depend on it. What it
builds and how it trains lives in pipeline.build (shared with distill).
"""

from __future__ import annotations

from dataclasses import asdict

from pipeline.build import (
    build_spad,
    build_student,
    datasets,
    load_stage_teacher,
    save_outputs,
    train_objective,
)
from pipeline.losses import DistillObjective
from pipeline.stages import StageContext, StageResult


def run(ctx: StageContext) -> StageResult:
    """Align a fresh student to the teacher with the SpAD feature terms."""
    from teachers import check_vocab

    r = ctx.recipe
    weights = asdict(r.align.weights)
    teacher = load_stage_teacher(r, ctx.accelerator, attn_maps=weights["saa"] > 0)
    student = build_student(r, teacher.vocab_size, teacher, ctx.log)
    check_vocab(student.config.vocab_size, teacher)
    spad = build_spad(r, student, teacher, weights, ctx.log)
    kd = {"kind": r.distill.kd.kind, "temperature": r.distill.kd.temperature, "beta": r.distill.kd.jsd_beta,
          "chunk_size": r.distill.kd.chunk_size, "impl": r.distill.kd.impl}
    objective = DistillObjective(student, weights, teacher=teacher, spad=spad, kd=kd)
    train, val = datasets(ctx)
    trainer, metrics = train_objective(ctx, objective, r.align, "align", train, val)
    outputs = save_outputs(ctx, trainer, objective)
    return StageResult(outputs=outputs, metrics={**metrics, "layer_map": list(spad.layer_map) if spad else []})
