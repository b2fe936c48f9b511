"""Which teacher layer each student layer is aligned with."""

from __future__ import annotations

import logging

from teachers.errors import TeacherError

log = logging.getLogger(__name__)


def uniform_layer_map(n_student: int, n_teacher: int) -> list[int]:
    """Evenly spaced map: student layer i -> teacher layer ceil((i + 1) * n_teacher / n_student) - 1.

    The last student layer always maps to the last teacher layer; with more student than teacher layers,
    consecutive student layers share a teacher layer.
    """
    return [((i + 1) * n_teacher + n_student - 1) // n_student - 1 for i in range(n_student)]


def layer_map(n_student: int, n_teacher: int, overrides: dict[int, int] | None = None) -> list[int]:
    """Student layer i -> teacher layer index (0-based), uniform by default, with validated overrides.

    overrides: {student layer: teacher layer}, e.g. from recipe key teacher.layer_map. Logs the final map.
    """
    for name, n in (("student", n_student), ("teacher", n_teacher)):
        if not _is_int(n) or n < 1:
            raise TeacherError(f"layer map: {name} layer count must be a positive int, got {n!r}")
    mapping = uniform_layer_map(n_student, n_teacher)
    for s, t in (overrides or {}).items():
        if not _is_int(s) or not 0 <= s < n_student:
            raise TeacherError(f"teacher.layer_map.{s}: student layer must be an int in [0, {n_student - 1}]")
        if not _is_int(t) or not 0 <= t < n_teacher:
            raise TeacherError(f"teacher.layer_map.{s}={t!r}: teacher layer must be an int in "
                               f"[0, {n_teacher - 1}]")
        mapping[s] = t
    log.info("layer map (student -> teacher, of %d): %s", n_teacher,
             ", ".join(f"{s}->{t}" for s, t in enumerate(mapping)))
    return mapping


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
