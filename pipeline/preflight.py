"""Checks of the teacher, the launcher and memory that run before any stage (called by runner.preflight).

- check_launcher: a recipe whose strategy needs a multi-process launcher (DeepSpeed) started without one is
  one line naming the launch command, not DeepSpeed's MPI discovery traceback (`No module named 'mpi4py'`).
- check_teacher: the teacher's sizes (teachers.describe_teacher: config and safetensors headers, no weights
  loaded; a Hub id offline and uncached is the one-line "no network" error) against the recipe: data.seq_len
  within its positions, student.config.d_model within its embedding width for student.init_from_teacher.
- check_memory (pipeline.memory): each stage that will run the teacher or train, at its batch size, against
  the memory available.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from pipeline.errors import ConfigError

LOG = logging.getLogger("spikedistill")
TEACHER_STAGES = ("teacher_cache", "align", "distill")
# what DeepSpeed reads from the environment before it falls back to MPI discovery (deepspeed.comm)
LAUNCHER_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")


def check_launcher(recipe: Any, stages: list[str]) -> None:
    """ConfigError when distributed.strategy=deepspeed trains without a launcher's environment."""
    if recipe.distributed.strategy != "deepspeed" or not any(s in ("align", "distill") for s in stages):
        return
    missing = [v for v in LAUNCHER_ENV if v not in os.environ]
    if missing:
        raise ConfigError(
            f"distributed.strategy=deepspeed needs a launcher ({', '.join(missing)} not set): start it with "
            "`accelerate launch --config_file recipes/accelerate/deepspeed_zero2.yaml -m pipeline run RECIPE ...` "
            "or `torchrun --nproc_per_node N -m pipeline run RECIPE ...`, or set distributed.strategy=auto for "
            "one process")


def check_teacher(recipe: Any) -> Any:
    """The teachers.TeacherShape of teacher.spec, after checking it against the recipe (ConfigError or
    TeacherError naming the key)."""
    from pipeline.recipe import student_config
    from teachers import describe_teacher

    t = recipe.teacher
    shape = describe_teacher(t.spec, trust_remote_code=t.trust_remote_code)
    if shape.max_positions is not None and recipe.data.seq_len > shape.max_positions:
        raise ConfigError(f"data.seq_len={recipe.data.seq_len} exceeds the teacher's max_length "
                          f"{shape.max_positions} ({t.spec}); lower data.seq_len")
    if recipe.student.init_from_teacher:
        d_model = student_config(recipe, shape.vocab).d_model
        width = min(shape.embed_width, shape.vocab)
        if d_model > width:
            raise ConfigError(f"student.init_from_teacher: the student's d_model={d_model} exceeds the embedding "
                              f"width {width} of teacher {t.spec}; set student.config.d_model to {width} or less, "
                              "or student.init_from_teacher=false")
    return shape


def check_teacher_stages(recipe: Any, stages: list[str]) -> None:
    """check_teacher, then the memory check of `stages` (those among teacher_cache, align, distill)."""
    from pipeline.memory import check_memory, gb

    stages = [s for s in stages if s in TEACHER_STAGES]
    if not stages:
        return
    shape = check_teacher(recipe)
    for est in check_memory(recipe, stages, shape):
        LOG.info("[%s] estimated peak memory %s at %s=%d", est.stage, gb(est.total()), est.batch_key, est.batch)
