"""Distillation losses: soft-target KD (dense or sparse top-k), chunked logit losses, and the SpAD terms.

Every loss here returns SUMS over tokens (never means): the trainer divides by the number of tokens of the
whole accumulated step across all ranks, so 4 micro-batches of 2 rows equal one batch of 8 rows exactly.

KD kinds (p = student, q = teacher, both softened by the temperature tau, scaled by tau^2):
    forward_kl   KL(q || p) = sum q (log q - log p)
    reverse_kl   KL(p || q) = sum p (log p - log q)
    jsd          generalized JSD with m = beta q + (1 - beta) p:  beta KL(q || m) + (1 - beta) KL(p || m);
                 beta = 0 is forward KL and beta = 1 reverse KL (the TRL GKD convention).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

KD_KINDS = ("forward_kl", "reverse_kl", "jsd")
IGNORE_INDEX = -100
# Lower bound on a teacher's tail mass when the student still has a tail: keeps reverse KL finite when the
# stored top-k already sum to 1 (bf16 rounding) while moving the forward KL by at most ~1e-9 nats.
TAIL_FLOOR = 1e-10


class _Sparse(NamedTuple):
    ids: torch.Tensor
    logprobs: torch.Tensor
    tail_mass: torch.Tensor


def is_sparse(target: Any) -> bool:
    """True for teachers.cache.SparseTargets (or anything with ids, logprobs and tail_mass)."""
    return all(hasattr(target, name) for name in ("ids", "logprobs", "tail_mass"))


def _masked_sum(terms: torch.Tensor, log_weight: torch.Tensor) -> torch.Tensor:
    """sum over the last axis of exp(log_weight) * terms, with 0 * anything = 0 where the weight is 0."""
    weight = log_weight.exp()
    return torch.where(weight > 0, weight * terms, torch.zeros_like(terms)).sum(-1)


def _divergence(log_p: torch.Tensor, log_q: torch.Tensor, kind: str, beta: float) -> torch.Tensor:
    """Per-row divergence between student log-probs log_p [N, K] and teacher log-probs log_q [N, K] -> [N]."""
    if kind == "jsd" and beta == 0.0:
        kind = "forward_kl"
    if kind == "jsd" and beta == 1.0:
        kind = "reverse_kl"
    if kind == "forward_kl":
        return _masked_sum(log_q - log_p, log_q)
    if kind == "reverse_kl":
        return _masked_sum(log_p - log_q, log_p)
    if kind == "jsd":
        log_m = torch.logsumexp(torch.stack([log_q + math.log(beta), log_p + math.log(1.0 - beta)]), dim=0)
        return beta * _masked_sum(log_q - log_m, log_q) + (1.0 - beta) * _masked_sum(log_p - log_m, log_p)
    raise ValueError(f"kd kind must be one of {KD_KINDS}, got {kind!r} (set distill.kd.kind)")


def _sparse_buckets(
    student_logits: torch.Tensor, target: Any, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map student and teacher onto the k stored ids plus one tail bucket -> (log_p, log_q), each [N, k(+1)]."""
    ids = target.ids.long()
    s = student_logits.float() / temperature
    lse = torch.logsumexp(s, dim=-1, keepdim=True)
    log_p_ids = s.gather(-1, ids) - lse
    t = target.logprobs.float() / temperature
    if ids.shape[-1] >= s.shape[-1]:
        # k = V: the complement is empty, so there is no tail bucket (any tail_mass is rounding residue).
        return log_p_ids, torch.log_softmax(t, dim=-1)
    # Student tail: logsumexp over the complement of the k ids, computed directly (no 1 - sum cancellation).
    log_p_tail = torch.logsumexp(s.scatter(-1, ids, float("-inf")), dim=-1, keepdim=True) - lse
    log_tail = target.tail_mass.float().clamp_min(TAIL_FLOOR).log().unsqueeze(-1) / temperature
    log_q = torch.log_softmax(torch.cat([t, log_tail], dim=-1), dim=-1)
    return torch.cat([log_p_ids, log_p_tail], dim=-1), log_q


def kd_loss(
    student_logits: torch.Tensor,
    target: Any,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
) -> torch.Tensor:
    """Per-token soft-target loss, tau^2 * D(teacher, student) at temperature tau -> [N].

    student_logits: [N, V]. target: dense teacher logits [N, V], or sparse top-k targets
    (teachers.cache.SparseTargets: ids [N, k], logprobs [N, k] = teacher log-softmax at temperature 1,
    tail_mass [N] = 1 - sum exp(logprobs)).

    Sparse semantics: the teacher distribution has k + 1 buckets, the k stored tokens and one tail bucket
    holding tail_mass; it is tempered like logits (log-probabilities / tau, the tail as one pseudo-token of
    log-probability log(tail_mass)) and renormalised over the k + 1 buckets. The student's tempered
    distribution is mapped onto the same buckets: its probabilities at the k ids, and all the rest of its
    mass in the tail bucket (a logsumexp over the complement, computed stably). With k = V there is no
    complement and no tail bucket, and the loss equals the dense one.
    """
    if kind not in KD_KINDS:
        raise ValueError(f"kd kind must be one of {KD_KINDS}, got {kind!r} (set distill.kd.kind)")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta} (set distill.kd.jsd_beta)")
    if is_sparse(target):
        log_p, log_q = _sparse_buckets(student_logits, target, temperature)
    else:
        log_p = torch.log_softmax(student_logits.float() / temperature, dim=-1)
        log_q = torch.log_softmax(target.float() / temperature, dim=-1)
    return temperature**2 * _divergence(log_p, log_q, kind, beta)


TeacherLogits = Callable[[slice], torch.Tensor]


def _teacher_chunk(teacher: Any, rows: slice) -> Any:
    """The teacher's targets for token rows `rows`: dense logits [n, V], sparse targets, or None."""
    if teacher is None:
        return None
    if is_sparse(teacher):
        return _Sparse(teacher.ids[rows], teacher.logprobs[rows], teacher.tail_mass[rows])
    if torch.is_tensor(teacher):
        return teacher[rows]
    with torch.no_grad():
        return teacher(rows)


def _chunk_sums(h, labels, head, teacher, rows, kind, temperature, beta) -> torch.Tensor:
    """(kd_sum, ce_sum) of one token chunk -> [2]; the logits live only inside this call."""
    logits = head(h).float()
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    target = _teacher_chunk(teacher, rows)
    if target is None:
        return torch.stack([ce * 0.0, ce])
    valid = (labels != IGNORE_INDEX).float()
    kd = (kd_loss(logits, target, kind, temperature, beta) * valid).sum()
    return torch.stack([kd, ce])


def chunked_logit_losses(
    head_input: torch.Tensor,
    head: Callable[[torch.Tensor], torch.Tensor],
    labels: torch.Tensor,
    teacher: TeacherLogits | torch.Tensor | Any | None,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    chunk_size: int = 1024,
    beta: float = 0.5,
) -> dict[str, torch.Tensor]:
    """KD and CE sums over tokens without ever holding [N, V] student and teacher logits at once.

    head_input: [N, C] what the LM head reads; head: h [n, C] -> logits [n, V]; labels: [N] next-token ids
    (IGNORE_INDEX rows count in neither loss); teacher: a callable rows (a slice) -> teacher logits [n, V],
    dense logits [N, V], sparse targets with [N, k] fields, or None (CE only, kd_sum = 0).
    Each chunk of `chunk_size` tokens is wrapped in torch.utils.checkpoint, so the backward recomputes its
    logits one chunk at a time too.
    Returns {"kd_sum": scalar, "ce_sum": scalar, "n_tokens": int64 scalar}.
    """
    if kind not in KD_KINDS:
        raise ValueError(f"kd kind must be one of {KD_KINDS}, got {kind!r} (set distill.kd.kind)")
    sums = head_input.new_zeros(2, dtype=torch.float32)
    for start in range(0, head_input.shape[0], chunk_size):
        rows = slice(start, start + chunk_size)
        args = (head_input[rows], labels[rows], head, teacher, rows, kind, temperature, beta)
        if torch.is_grad_enabled() and head_input.requires_grad:
            sums = sums + checkpoint(_chunk_sums, *args, use_reentrant=False)
        else:
            sums = sums + _chunk_sums(*args)
    return {"kd_sum": sums[0], "ce_sum": sums[1], "n_tokens": (labels != IGNORE_INDEX).sum()}


def logit_losses(head_input, head: nn.Module, labels, teacher, kind, temperature, chunk_size, beta=0.5,
                 impl: str = "chunked") -> dict[str, torch.Tensor]:
    """chunked_logit_losses, or pipeline.fused_kd.fused_head_kd_loss when impl == "fused" (same contract)."""
    if impl == "chunked":
        return chunked_logit_losses(head_input, head, labels, teacher, kind, temperature, chunk_size, beta)
    if impl == "fused":
        from pipeline.fused_kd import fused_head_kd_loss

        if getattr(head, "bias", None) is not None:
            raise ValueError("distill.kd.impl=fused needs an LM head without bias; use impl=chunked")
        return fused_head_kd_loss(head_input, head.weight, labels, teacher, kind, temperature, chunk_size,
                                  jsd_beta=beta)
    raise ValueError(f"distill.kd.impl must be 'chunked' or 'fused', got {impl!r}")
