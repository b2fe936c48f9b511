"""Teachers: load any HF causal LM (alias, Hub id, local dir, GGUF), capture its outputs, cache its logits.

A leaf package: imports neither `students` nor `pipeline`/`eval`.
"""

from teachers.errors import CacheError, DataError, TeacherError
from teachers.layer_map import layer_map
from teachers.loading import check_spec, check_vocab, load_teacher
from teachers.outputs import Teacher, TeacherOutput
from teachers.shape import TeacherShape, describe_teacher

__all__ = ["CacheError", "DataError", "Teacher", "TeacherError", "TeacherOutput", "TeacherShape", "check_spec",
           "check_vocab", "describe_teacher", "layer_map", "load_teacher"]
