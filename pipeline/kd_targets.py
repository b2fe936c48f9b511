"""What both KD loss paths share: the KD kinds, the ignored label, the tail floor and the sparse target type.

`pipeline.losses` (the chunked reference) and `pipeline.fused_kd` (the fused head + loss) both import this
module; it imports neither, so the two never import each other in a circle.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch

KD_KINDS = ("forward_kl", "reverse_kl", "jsd")
IGNORE_INDEX = -100
# Lower bound on a teacher's tail mass when the student still has a tail: keeps reverse KL finite when the
# stored top-k already sum to 1 (bf16 rounding) while moving the forward KL by at most ~1e-9 nats.
TAIL_FLOOR = 1e-10

TeacherLogits = Callable[[slice], torch.Tensor]


class SparseRows(NamedTuple):
    """Sparse top-k teacher targets for token rows: ids [N, k], logprobs [N, k], tail_mass [N].

    Same fields as teachers.cache.SparseTargets; the k ids of a row must be distinct (top-k ids are).
    """

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail_mass: torch.Tensor


def is_sparse(target: Any) -> bool:
    """True for teachers.cache.SparseTargets (or anything with ids, logprobs and tail_mass)."""
    return all(hasattr(target, name) for name in ("ids", "logprobs", "tail_mass"))


def is_hidden(target: Any) -> bool:
    """True for teachers.cache.HiddenTargets (a hidden store's rows: a hidden tensor and the teacher's head)."""
    return hasattr(target, "hidden") and hasattr(target, "head")
