"""Distillation losses: soft-target KD (dense or sparse top-k), chunked logit losses, and the SpAD terms.

Every loss here returns SUMS over tokens (never means): the trainer divides by the number of tokens of the
whole accumulated step across all ranks, so 4 micro-batches of 2 rows equal one batch of 8 rows exactly.

KD kinds (p = student, q = teacher, both softened by the temperature tau, scaled by tau^2):
    forward_kl   KL(q || p) = sum q (log q - log p)
    reverse_kl   KL(p || q) = sum p (log p - log q)
    jsd          generalized JSD with m = beta q + (1 - beta) p:  beta KL(q || m) + (1 - beta) KL(p || m)
                 for 0 < beta < 1 (Agarwal et al. 2024, GKD, arXiv 2306.13649; TRL's GKDTrainer). It is
                 NOT a smooth interpolation between the two KLs: it tends to 0 at both ends, ~beta KL(q || p)
                 as beta -> 0 and ~(1 - beta) KL(p || q) as beta -> 1. The endpoints are set by convention
                 (TRL's): beta = 0 is forward KL and beta = 1 is reverse KL, so the loss jumps at each end,
                 e.g. from ~0.001 KL(q || p) at beta = 0.001 to KL(q || p) at beta = 0.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pipeline.fused_kd import fused_head_kd_loss
from pipeline.kd_targets import (
    IGNORE_INDEX,
    KD_KINDS,
    TAIL_FLOOR,
    SparseRows,
    TeacherLogits,
    is_hidden,
    is_sparse,
)


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
    """Map student and teacher onto the k stored ids plus one tail bucket -> (log_p, log_q), each [N, k(+1)].

    The target holds the teacher at temperature tau already (teachers.cache.topk_targets(z, k, tau)): its
    log-probs and tail mass, renormalised over the buckets, give log_q. The student's tempered distribution
    softmax(s / tau) over the full vocabulary gives log_p: its log-probabilities at the k ids and the
    logsumexp over the complement for the tail. Tempering before bucketing, on both sides, is what makes
    this the tempered full-vocabulary KL up to the tail's inner shape; tempering the bucket distributions
    (the format-1 cache) made a different loss: on the bundled teacher at tau = 2 its tail bucket held 7% of
    the tempered mass where the full distribution has 79% (bench/kd_cache.py).
    """
    ids = target.ids.long()
    # in float64 (this is the reference path), shifted by the row maximum before dividing by tau: at small
    # tau, float32 rounding of s / tau would reach the gradients (7e-5 relative at tau 0.05)
    log_p = torch.log_softmax(_shifted(student_logits.double()) / temperature, dim=-1)
    t = target.logprobs.double()
    if ids.shape[-1] >= log_p.shape[-1]:
        # k = V: the complement is empty, so there is no tail bucket (any tail_mass is rounding residue).
        return log_p.gather(-1, ids), torch.log_softmax(t, dim=-1)
    # Student tail: logsumexp over the complement of the k ids, computed directly (no 1 - sum cancellation).
    log_tail_p = torch.logsumexp(log_p.scatter(-1, ids, float("-inf")), dim=-1, keepdim=True)
    log_tail_q = target.tail_mass.double().clamp_min(TAIL_FLOOR).log().unsqueeze(-1)
    return (torch.cat([log_p.gather(-1, ids), log_tail_p], dim=-1),
            torch.log_softmax(torch.cat([t, log_tail_q], dim=-1), dim=-1))


def _shifted(logits: torch.Tensor) -> torch.Tensor:
    """logits minus their (constant, gradient-free) row maximum: the same softmax, smaller numbers."""
    return logits - logits.detach().amax(dim=-1, keepdim=True)


def kd_loss(
    student_logits: torch.Tensor,
    target: Any,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    beta: float = 0.5,
) -> torch.Tensor:
    """Per-token soft-target loss, tau^2 * D(teacher, student) at temperature tau -> [N] (nats, float32).

    student_logits: [N, V]. target: dense teacher logits [N, V], or sparse top-k targets of the teacher AT
    TEMPERATURE tau (teachers.cache.SparseTargets from topk_targets(z, k, tau): ids [N, k], logprobs [N, k] =
    log softmax(z / tau) of those ids, tail_mass [N] = the rest of softmax(z / tau)'s mass).

    Dense: D between softmax(t / tau) and softmax(s / tau) over the full vocabulary (kinds in the module
    docstring); the tau^2 factor (Hinton et al. 2015, arXiv 1503.02531) keeps the gradient's scale as tau changes.
    Sparse: both tempered full-vocabulary distributions are taken onto k + 1 buckets, the k stored ids and
    one tail bucket (the teacher's tail_mass; the student's mass outside the k ids, a logsumexp of s / tau
    over the complement, computed stably), and D is that of the bucket distributions. For forward KL this
    is the bucketed KL, a lower bound on the full-vocabulary tau^2 KL (data-processing inequality), short of it
    by tau^2 Q_tail KL(q_tail || p_tail) of the two tails' inner shapes; its gradient on the k ids is exact.
    It is 0 when the student equals the teacher, at any tau. With k = V there is no tail bucket and it equals
    the dense loss. Targets built at another temperature give a different loss; teachers.cache keys the
    cache by tau for that reason. Raises ValueError for an unknown kind or beta outside [0, 1].
    """
    if kind not in KD_KINDS:
        raise ValueError(f"kd kind must be one of {KD_KINDS}, got {kind!r} (set distill.kd.kind)")
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd beta must be in [0, 1], got {beta} (set distill.kd.jsd_beta)")
    if is_sparse(target):
        log_p, log_q = _sparse_buckets(student_logits, target, temperature)
    else:
        log_p = torch.log_softmax(_shifted(student_logits.float()) / temperature, dim=-1)
        log_q = torch.log_softmax(_shifted(target.float()) / temperature, dim=-1)
    return (temperature**2 * _divergence(log_p, log_q, kind, beta)).float()


def _teacher_chunk(teacher: Any, rows: slice) -> Any:
    """The teacher's targets for token rows `rows`: dense logits [n, V], sparse targets, or None."""
    if teacher is None:
        return None
    if is_sparse(teacher):
        return SparseRows(teacher.ids[rows], teacher.logprobs[rows], teacher.tail_mass[rows])
    if torch.is_tensor(teacher):
        return teacher[rows]
    with torch.no_grad():
        return teacher(rows)


def _valid_rows(target: Any, valid: torch.Tensor) -> Any:
    """The rows of dense logits [n, V] or sparse targets [n, k] whose label is not IGNORE_INDEX."""
    if is_sparse(target):
        return SparseRows(target.ids[valid], target.logprobs[valid], target.tail_mass[valid])
    return target[valid]


def _chunk_sums(h, labels, head, teacher, rows, kind, temperature, beta) -> torch.Tensor:
    """(kd_sum, ce_sum) of one token chunk -> [2]; the logits live only inside this call."""
    logits = head(h).float()
    ce = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    target = _teacher_chunk(teacher, rows)
    if target is None:
        return torch.stack([ce * 0.0, ce])
    # ignored rows are left out, not multiplied by 0: their teacher rows may be anything (all -inf padding),
    # and 0 * NaN would poison both the sum and the gradient
    valid = labels != IGNORE_INDEX
    if not bool(valid.all()):
        logits, target = logits[valid], _valid_rows(target, valid)
    kd = kd_loss(logits, target, kind, temperature, beta).sum()
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


KD_IMPLS = ("fused", "chunked")


def logit_losses(head_input, head: nn.Module, labels, teacher, kind, temperature, chunk_size, beta=0.5,
                 impl: str = "fused", loss_weights: tuple[float, float] | None = None) -> dict[str, torch.Tensor]:
    """KD and CE sums of head(head_input) against labels and the teacher (`chunked_logit_losses`' contract).

    impl "fused" (the default, the fast path) runs pipeline.fused_kd.fused_head_kd_loss, with `loss_weights`
    (w_kd, w_ce) passed on so the gradient is computed in the forward; a head with a bias falls back to the
    chunked path. impl "chunked" runs chunked_logit_losses, the autograd reference. Raises ValueError for any
    other impl.
    """
    if impl not in KD_IMPLS:
        raise ValueError(f"distill.kd.impl must be one of {KD_IMPLS}, got {impl!r}")
    if impl == "fused" and getattr(head, "bias", None) is None:
        return fused_head_kd_loss(head_input, head.weight, labels, teacher, kind, temperature, chunk_size,
                                  jsd_beta=beta, loss_weights=loss_weights)
    return chunked_logit_losses(head_input, head, labels, teacher, kind, temperature, chunk_size, beta)


# ------------------------------------------------------------------------------------------------ SpAD
def head_mix_matrix(n_student: int, n_teacher: int) -> torch.Tensor:
    """Mean-pool map of teacher heads onto student heads -> [H_s, H_t], rows summing to 1.

    With H_t >= H_s, teacher head j belongs to student head floor(j * H_s / H_t) (consecutive groups,
    averaged); with H_t < H_s, student head i copies teacher head floor(i * H_t / H_s).
    """
    mix = torch.zeros(n_student, n_teacher)
    if n_teacher >= n_student:
        for j in range(n_teacher):
            mix[j * n_student // n_teacher, j] = 1.0
    else:
        for i in range(n_student):
            mix[i, i * n_teacher // n_student] = 1.0
    return mix / mix.sum(1, keepdim=True)


def lif_rate(x: torch.Tensor, time_steps: int, lif: dict[str, Any]) -> torch.Tensor:
    """Feed x [..., N] as a constant current into a LIF (students.ops.lif_scan with the keyword arguments `lif`)
    for `time_steps` steps from rest; mean spikes -> [..., N], in {0, 1/T, ..., 1}. Differentiable through the
    neuron's surrogate gradient."""
    from students.ops import lif_scan

    flat = x.reshape(1, 1, -1).float().expand(1, time_steps, -1)
    spikes, _ = lif_scan(flat, **lif)
    return spikes.mean(1).reshape(x.shape)


def lif_kwargs(config: Any) -> dict[str, Any]:
    """The lif_scan keyword arguments of a SpikeGPTConfig (the student's own neuron)."""
    return {"tau": config.lif_tau, "v_threshold": config.lif_threshold, "reset": config.lif_reset,
            "decay_input": getattr(config, "lif_decay_input", True),
            "detach_reset": getattr(config, "lif_detach_reset", False),
            "surrogate": config.surrogate, "alpha": config.surrogate_alpha}


# A hair above threshold, so that float rounding cannot keep an entry equal to the row's scale from firing.
_AT_THRESHOLD = 1.0 + 1e-5


def rate_code(x: torch.Tensor, scale: torch.Tensor, time_steps: int, lif: dict[str, Any]) -> torch.Tensor:
    """Rate code of each row of x [..., N] in the student's own neuron -> rates [..., N] in {0, 1/T, ..., 1}.

    Each row is divided by its scale [..., 1] and fed as a constant current for `time_steps` steps
    (`lif_rate`), amplified so that an entry equal to the scale drives the LIF to threshold in one step
    (current x / scale * v_threshold / g, g = 1/tau with input decay, else 1). With SpikeGPT's LIF (tau 2, hard
    reset) an entry at f times the scale fires at every step for f >= 1, at rate 1/2 for 2/3 <= f < 1 (T >= 2),
    and never for f < 1/2; entries <= 0 never fire; rows whose scale is <= 0 give zeros. Because the neuron is
    the student's own (its tau, threshold, reset and input decay), every target is a rate its spikes can take.
    Differentiable through the neuron's surrogate gradient where x (or scale) requires grad.
    """
    gain = 1.0 / lif["tau"] if lif.get("decay_input", True) else 1.0
    ok = scale > 0
    drive = x / torch.where(ok, scale, torch.ones_like(scale)) * (lif["v_threshold"] / gain * _AT_THRESHOLD)
    return lif_rate(torch.where(ok, drive, torch.zeros_like(drive)), time_steps, lif)


def attention_rate_code(maps: torch.Tensor, time_steps: int, lif: dict[str, Any]) -> torch.Tensor:
    """Rate code of causal attention maps [..., L_q, K] (query i sees keys 0..i): the scale of row i is its
    uniform share, row sum / (i + 1), so a key that gets at least its uniform share of the attention fires at
    every step (`rate_code`). On SmolLM2-135M this leaves ~4 firing keys per row at T = 1 (the attention sink
    at key 0 and ~3 others) and ~6-8 at T = 4."""
    n_causal = torch.arange(1, maps.shape[-2] + 1, device=maps.device, dtype=maps.dtype).clamp_max(maps.shape[-1])
    return rate_code(maps, maps.sum(-1, keepdim=True) / n_causal[:, None], time_steps, lif)


def feature_rate_code(h: torch.Tensor, time_steps: int, lif: dict[str, Any]) -> torch.Tensor:
    """Rate code of features [..., C]: the scale of each token is its root mean square over channels, so a
    channel at +1 rms or more fires at every step (`rate_code`); ~5% of LayerNorm'd SmolLM2-135M features fire
    at T = 1, ~14% at T = 4."""
    return rate_code(h, h.pow(2).mean(-1, keepdim=True).sqrt(), time_steps, lif)


def row_distribution(maps: torch.Tensor, time_steps: int) -> torch.Tensor:
    """Attention maps [..., K] divided by their row sums (rows sum to 1; an all-zero row stays zero).

    The sum is floored at 1/T, the smallest non-zero row sum of a T-step spike map, so a silent row of the
    student's map gets a bounded gradient instead of one of order 1/eps.
    """
    return maps / maps.sum(-1, keepdim=True).clamp_min(1.0 / time_steps)


FEATURE_TERMS = ("ea", "saa", "sfa")


@dataclass
class SpADTargets:
    """The teacher's side of the SpAD terms, for positions [0, P) and keys [0, K) of a batch of B rows:
    embeddings [B, P, C_t] (EA; the input of the teacher's decoder layer 0); features: one [B, P, C_t] per
    mapped student layer (SFA; the teacher state it is aligned to, LayerNorm'd when sfa_target_norm); maps: one
    [B, H, P, K] per mapped student layer (SAA; the teacher's map mapped onto the student's H = H_s heads by
    the fixed mean for head_mapping "mean", the raw H = H_t heads for "learned", whose mix the loss learns).
    A term without weight is None. Made from the online teacher (SpADTargetSpec.extract) or read from the
    feature cache (teachers.feature_cache, `from_tensors`); SpADLoss reads both the same way."""

    embeddings: torch.Tensor | None = None
    features: tuple[torch.Tensor, ...] | None = None
    maps: tuple[torch.Tensor, ...] | None = None

    def to(self, device: str | torch.device) -> SpADTargets:
        def move(xs):
            return None if xs is None else tuple(x.to(device) for x in xs)

        emb = None if self.embeddings is None else self.embeddings.to(device)
        return SpADTargets(emb, move(self.features), move(self.maps))

    def tensors(self) -> dict[str, torch.Tensor]:
        """The stored form (teachers.feature_cache): {"embeddings": [B, P, C], "features": [B, n, P, C],
        "maps": [B, n, H, P, K]}, weighted terms only (per-layer tensors stacked on axis 1)."""
        out = {"embeddings": self.embeddings} if self.embeddings is not None else {}
        for name in ("features", "maps"):
            if getattr(self, name) is not None:
                out[name] = torch.stack(getattr(self, name), dim=1)
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> SpADTargets:
        """The inverse of `tensors` (a batch read from the feature cache)."""
        def layers(name):
            return tuple(tensors[name].unbind(1)) if name in tensors else None

        return cls(tensors.get("embeddings"), layers("features"), layers("maps"))


@dataclass(frozen=True)
class SpADTargetSpec:
    """What SpADLoss reads from the teacher: its weighted terms (among ea, saa, sfa), the teacher layer of each
    student layer, how teacher heads map onto the student's, and whether SFA's target is LayerNorm'd.
    `extract` makes the targets from a teacher forward; `key` is what they depend on (the feature cache's key)."""

    layer_map: tuple[int, ...]
    terms: tuple[str, ...]
    head_mapping: str = "mean"
    student_heads: int = 1
    teacher_heads: int = 1
    sfa_target_norm: bool = False

    def extract(self, teacher_out: Any, n_pos: int, n_keys: int) -> SpADTargets:
        """SpADTargets of the first n_pos positions (and n_keys keys) from a teacher output with embeddings
        [B, L, C_t], hidden_states (n_t x [B, L, C_t]) and attentions (n_t x [B, H_t, L, L]) as the terms need."""
        out = SpADTargets()
        if "ea" in self.terms:
            out.embeddings = teacher_out.embeddings[:, :n_pos].float()
        if "sfa" in self.terms:
            out.features = tuple(self._sfa_target(teacher_out.hidden_states[t][:, :n_pos].float())
                                 for t in self.layer_map)
        if "saa" in self.terms:
            out.maps = tuple(self._saa_map(teacher_out.attentions[t][:, :, :n_pos, :n_keys].float())
                             for t in self.layer_map)
        return out

    def _sfa_target(self, h_t: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(h_t, h_t.shape[-1:]) if self.sfa_target_norm else h_t

    def _saa_map(self, a_t: torch.Tensor) -> torch.Tensor:
        if self.head_mapping == "learned":
            return a_t
        mix = head_mix_matrix(self.student_heads, self.teacher_heads).to(a_t.device, a_t.dtype)
        return torch.einsum("st,btqk->bsqk", mix, a_t)

    @property
    def map_heads(self) -> int:
        """Heads of the maps in its targets: the student's for "mean", the teacher's for "learned"."""
        return self.teacher_heads if self.head_mapping == "learned" else self.student_heads

    def key(self) -> dict:
        """What its targets depend on, the fields that apply to its terms: terms, layer_map (saa, sfa),
        head_mapping and heads (saa), sfa_target_norm (sfa)."""
        key: dict[str, Any] = {"terms": list(self.terms)}
        if "saa" in self.terms or "sfa" in self.terms:
            key["layer_map"] = list(self.layer_map)
        if "saa" in self.terms:
            key.update(head_mapping=self.head_mapping, heads=self.map_heads)
        if "sfa" in self.terms:
            key["sfa_target_norm"] = self.sfa_target_norm
        return key


class SpADLoss(nn.Module):
    """Spike-aware alignment terms (BiSpikCLM SpAD, arXiv 2605.13859) with their learned projections, as
    per-token SUMS.

    EA   MSE(P(E_S), E_T): P a linear map of the student's embedding output (averaged over T steps).
    SAA  per mapped layer, averaged over layers: (1 - g) ||D(A_S) - M A_T||^2 + g ||D(A_S) - D(R(M A_T))||^2,
         g = rate_mix (0.5), ||.||^2 the squared distance between two rows, summed over keys (each query's
         distance between two distributions over its keys, in [0, 2]) and averaged over heads. A_S
         [B, H_s, L, L] is the student's map averaged over its T steps (a spike rate for sfsa); D(.) divides
         each row by its sum (`row_distribution`), so both terms compare where each query's attention goes, not
         how much of it there is; M [H_s, H_t] maps teacher heads onto student heads (rows of M A_T sum to 1):
         "mean" = fixed mean-pool groups (head_mix_matrix), "learned" = a free mix per layer initialised to it.
         R(.) = attention_rate_code: each row of the mapped teacher map, rescaled so that a key's uniform share
         reaches the threshold, is fed into the student's own LIF for T steps.
         Why a sum over keys, not the mean of an elementwise MSE: the entries of a row that spreads over n keys
         are ~1/n, and a mean over the L key columns divides once more by L, so the mean can never exceed 2 / L
         per query (0.016 at L = 128) whatever the maps do, and shrinks as the context grows. On the study's
         srwkv student that left SAA's gradient on the block weights at ~1% of SFA's at the published weights
         (bench/spad_grads.py); the sum is bounded by 2 at any L. The sum compares distributions, so the student
         side is D(A_S): for srwkv and sfsa_linear, whose rows already sum to 1 (or 0), that changes nothing; for
         sfsa it compares where the binary map fires instead of spike counts with probabilities.
    SFA  per mapped layer, averaged over layers: (1 - g) MSE(z, h_T) + g MSE(R(z), R(h_T)) with z = LN(MLP(h_S))
         and R(.) = feature_rate_code (each token rescaled by its rms, then the student's LIF for T steps); the
         student side goes through the same neuron with its surrogate gradient, and neither side depends on the
         raw scale of its features. sfa_target_norm=True compares against LN(h_T) (no affine) instead of h_T:
         raw residual streams carry massive activations (SmolLM2-135M: SFA ~4e3 per token against EA ~0.2),
         which drown the other terms.
    Source: the 50/50 mix of direct and rate terms, rate codes of rescaled rows and the row-normalised map
    comparison follow SpikLLM's reimplementation of SpAD (github JoeLu20051115/SpikLLM,
    bispikclm/distill/spad.py). It rescales each row by its maximum and uses its own soft-reset neuron; here
    the neuron is the student's, and the scale is a typical entry (uniform share, rms) because on SmolLM2-135M
    the row maximum is the attention sink at key 0 in every row, and one massive channel of the features, so
    a max-scaled code is a one-hot on them (measured: 1.0 firing key per row, 0.2% of channels, at T = 1).
    Every EA / SFA MSE is a mean over the feature axis of each token, and every SAA distance a mean over heads;
    both are summed over the first n_pos positions. Only terms with a weight > 0 get parameters (DDP needs every parameter to get a gradient).
    `lif` are the student's lif_scan keyword arguments (`lif_kwargs(config)`); time_steps its T.
    The teacher's side comes as SpADTargets (`teacher_targets` of an online teacher forward, or a batch of the
    feature cache): `target_spec` says what they hold, and the terms are computed from them the same way.
    """

    def __init__(self, *, student_dim: int, teacher_dim: int, layer_map: list[int], student_heads: int,
                 teacher_heads: int, weights: dict[str, float], head_mapping: str = "mean",
                 lif: dict[str, Any] | None = None, time_steps: int = 1, sfa_target_norm: bool = False,
                 rate_mix: float = 0.5):
        super().__init__()
        self.sfa_target_norm = sfa_target_norm
        if head_mapping not in ("mean", "learned"):
            raise ValueError(f"align.head_mapping must be 'mean' or 'learned', got {head_mapping!r}")
        if not 0.0 <= rate_mix <= 1.0:
            raise ValueError(f"SpAD rate_mix must be in [0, 1], got {rate_mix}")
        self.layer_map = list(layer_map)
        self.weights = {k: float(weights.get(k, 0.0)) for k in ("ea", "saa", "sfa")}
        self.head_mapping, self.time_steps, self.rate_mix = head_mapping, time_steps, rate_mix
        self.lif = {"tau": 2.0, "v_threshold": 1.0, "reset": "hard", "decay_input": True, **(lif or {})}
        terms = tuple(k for k in FEATURE_TERMS if self.weights[k] > 0)
        self.target_spec = SpADTargetSpec(tuple(self.layer_map), terms, head_mapping, student_heads, teacher_heads,
                                          sfa_target_norm)
        if self.weights["ea"] > 0:
            self.ea_proj = nn.Linear(student_dim, teacher_dim)
        if self.weights["saa"] > 0 and head_mapping == "learned":
            mix = head_mix_matrix(student_heads, teacher_heads)
            self.head_mix = nn.ParameterList([nn.Parameter(mix.clone()) for _ in self.layer_map])
        if self.weights["sfa"] > 0:
            self.sfa_proj = nn.ModuleList([
                nn.Sequential(nn.Linear(student_dim, teacher_dim), nn.GELU(), nn.Linear(teacher_dim, teacher_dim),
                              nn.LayerNorm(teacher_dim))
                for _ in self.layer_map])

    @property
    def needs_attentions(self) -> bool:
        return self.weights["saa"] > 0

    @property
    def needs_hidden_states(self) -> bool:
        return self.weights["ea"] > 0 or self.weights["sfa"] > 0

    def teacher_targets(self, teacher_out: Any, n_pos: int, n_keys: int) -> SpADTargets:
        """The weighted terms' targets from an online teacher output (`SpADTargetSpec.extract`)."""
        return self.target_spec.extract(teacher_out, n_pos, n_keys)

    def forward(self, student_out: Any, targets: SpADTargets, n_pos: int) -> dict[str, torch.Tensor]:
        """student_out: hidden_states (n_layer+1 x [B, L, C_s]), attentions (n_layer x [B, H_s, L, L]);
        targets: the teacher's side for at least the first n_pos positions (online `teacher_targets` or the
        feature cache). Returns {"ea", "saa", "sfa"} sums over the first n_pos positions (weighted terms only).
        """
        out = {}
        if self.weights["ea"] > 0:
            e_s = student_out.hidden_states[0][:, :n_pos]
            out["ea"] = _token_mse(self.ea_proj(e_s.float()), targets.embeddings[:, :n_pos].float())
        if self.weights["saa"] > 0:
            out["saa"] = sum(self._saa(i, student_out, targets, n_pos)
                             for i in range(len(self.layer_map))) / len(self.layer_map)
        if self.weights["sfa"] > 0:
            out["sfa"] = sum(self._sfa(i, student_out, targets, n_pos)
                             for i in range(len(self.layer_map))) / len(self.layer_map)
        return out

    def saa_target(self, i: int, targets: SpADTargets, n_pos: int, n_keys: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(mapped teacher map M A_T, its rate code) for student layer i, each [B, H_s, n_pos, n_keys].
        Raises ValueError when targets.maps[i] has other heads than target_spec.map_heads."""
        a_t = targets.maps[i][:, :, :n_pos, :n_keys].float()
        if a_t.shape[1] != self.target_spec.map_heads:  # a map of other heads would broadcast or fail further on
            raise ValueError(f"SAA targets of student layer {i} have {a_t.shape[1]} heads; head_mapping "
                             f"{self.head_mapping!r} reads {self.target_spec.map_heads} (SpADTargets.maps)")
        if self.head_mapping == "learned":
            a_t = torch.einsum("st,btqk->bsqk", self.head_mix[i].to(a_t.dtype), a_t)
        return a_t, attention_rate_code(a_t, self.time_steps, self.lif)

    def _saa(self, i: int, student_out: Any, targets: SpADTargets, n_pos: int) -> torch.Tensor:
        steps = self.time_steps
        a_s = row_distribution(student_out.attentions[i][:, :, :n_pos].float(), steps)
        mapped, rates = self.saa_target(i, targets, n_pos, a_s.shape[-1])
        rate = _row_distance(a_s, row_distribution(rates, steps))
        return (1.0 - self.rate_mix) * _row_distance(a_s, mapped) + self.rate_mix * rate

    def _sfa(self, i: int, student_out: Any, targets: SpADTargets, n_pos: int) -> torch.Tensor:
        z = self.sfa_proj[i](student_out.hidden_states[i + 1][:, :n_pos].float())
        h_t = targets.features[i][:, :n_pos].float()
        steps = self.time_steps
        rates = _token_mse(feature_rate_code(z, steps, self.lif), feature_rate_code(h_t, steps, self.lif))
        return (1.0 - self.rate_mix) * _token_mse(z, h_t) + self.rate_mix * rates


def _token_mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum over tokens of the mean over features of (a - b)^2; a, b [B, L, C] -> scalar."""
    return (a - b).pow(2).mean(-1).sum()


def _row_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Attention maps [B, H, L, K]: per query token the squared distance between its rows (a sum over keys),
    averaged over heads, summed over tokens -> scalar."""
    return (a - b).pow(2).sum(-1).mean(1).sum()


# ----------------------------------------------------------------------------------------- objective
LOSS_TERMS = ("ea", "saa", "sfa", "sta", "hta")


class DistillObjective(nn.Module):
    """The trainable part of a training stage: the student plus the SpAD projections, as one module.

    forward(input_ids [B, L], targets=None, views=None, features=None) -> {"loss": weighted sum over next-token
    positions, "ea", "saa", "sfa", "kd", "ce": unweighted sums}. The teacher (frozen, not a submodule, so
    DDP/FSDP/DeepSpeed never wrap it) runs inside forward under no_grad; `targets` are cached sparse teacher
    targets [B, L, k], or a hidden store's HiddenTargets [B, L, C_t] (the full logits are made from them chunk
    by chunk), which replace the online teacher's logits for the STA term, and `features` cached SpAD
    targets (SpADTargets of the rows, teachers.feature_cache) which replace the online teacher for EA, SAA and
    SFA, so that with both the teacher is never run. A term with neither (e.g. validation rows of a cached run
    without a teacher) is left out. The trainer divides every sum by the token count of the whole step.

    subvocab: a teachers.subvocab.PieceTrie when the student's vocabulary is derived from the teacher's
    (student.vocab = subset:N | bytes): the teacher never reads the student's ids; the online STA target is
    the teacher's exact distribution over the student's vocabulary at each position, [B * (L - 1), V_s] dense,
    derived from `views` (B teachers.data.TeacherView of the rows; zero-mass tokens floored, see
    teachers.subvocab.floored). branch_floor: skip the branch tokens of relative ending mass below it
    (teachers.subvocab.exact_log_probs; recipe key teacher_cache.branch_floor, 0 = exact).
    """

    def __init__(self, student: nn.Module, weights: dict[str, float], *, teacher: Any = None,
                 spad: SpADLoss | None = None, kd: dict[str, Any] | None = None, subvocab: Any = None,
                 branch_floor: float = 0.0):
        super().__init__()
        self.student, self.spad, self.subvocab, self.branch_floor = student, spad, subvocab, float(branch_floor)
        self.weights = {k: float(weights.get(k, 0.0)) for k in LOSS_TERMS}
        self.kd = {"kind": "forward_kl", "temperature": 1.0, "chunk_size": 1024, "beta": 0.5, "impl": "fused",
                   **(kd or {})}
        self._teacher = (teacher,)  # a tuple, so nn.Module does not register or wrap it

    @property
    def teacher(self):
        return self._teacher[0]

    def forward(self, input_ids: torch.Tensor, targets: Any = None, views: Any = None,
                features: SpADTargets | None = None) -> dict[str, torch.Tensor]:
        sums = self.term_sums(input_ids, targets, views, features)
        loss = sum(self.weights[_WEIGHT_OF[k]] * v for k, v in sums.items())
        return {"loss": loss, **{k: v.detach() for k, v in sums.items()}}

    def term_sums(self, input_ids: torch.Tensor, targets: Any = None, views: Any = None,
                  features: SpADTargets | None = None) -> dict[str, torch.Tensor]:
        """The unweighted sums that forward weights, each a scalar with its graph: "ea", "saa", "sfa" for the
        SpAD terms with weight > 0 (when their targets exist: `features` or the online teacher), "kd" and "ce"
        when STA or HTA has one. With kd impl "fused" the head's gradient is made for w_sta * kd + w_hta * ce
        only; backpropagating kd or ce alone needs impl "chunked"."""
        spad = self.spad
        logit_terms = self.weights["sta"] > 0 or self.weights["hta"] > 0
        online = self.teacher is not None and self.subvocab is None and (
            (spad is not None and features is None) or (self.weights["sta"] > 0 and targets is None))
        spad_on = spad is not None and (features is not None or online)
        out = self._student_forward(input_ids, spad if spad_on else None)
        n_pos = input_ids.shape[1] - 1
        t_out = self.teacher(input_ids, logits=False, hidden_states=spad_on and features is None
                             and spad.needs_hidden_states) if online else None
        sums: dict[str, torch.Tensor] = {}
        if spad_on:
            spad_targets = features if features is not None else spad.teacher_targets(t_out, n_pos, input_ids.shape[1])
            sums.update(spad(out, spad_targets, n_pos))
        if logit_terms:
            sums.update(self._logit_terms(out.head_input, input_ids, t_out, targets, views))
        return sums

    def _student_forward(self, input_ids: torch.Tensor, spad: SpADLoss | None) -> Any:
        """The student's outputs up to its head (`.head_input`, the normed last hidden state)."""
        if getattr(self.student.config, "model_type", "") != "spikegpt":
            # a non-spiking HF baseline (e.g. the matched Llama): its decoder's final state feeds lm_head
            return _HeadInput(self.student.get_decoder()(input_ids).last_hidden_state)
        return self.student(input_ids, skip_logits=True,
                            output_hidden_states=spad is not None and spad.needs_hidden_states,
                            output_attentions=spad is not None and spad.needs_attentions)

    def _logit_terms(self, head_input, input_ids, t_out, targets, views=None) -> dict[str, torch.Tensor]:
        h = head_input[:, :-1].reshape(-1, head_input.shape[-1])
        labels = input_ids[:, 1:].reshape(-1)
        teacher: Any = None
        if self.weights["sta"] > 0 and targets is not None and is_hidden(targets):
            # a hidden store: the teacher's full logits again, one chunk at a time, as from the online teacher
            teacher = _head_logits(targets.hidden[:, :-1].reshape(-1, targets.hidden.shape[-1]), targets.head)
        elif self.weights["sta"] > 0 and targets is not None:
            k = targets.ids.shape[-1]
            teacher = SparseRows(targets.ids[:, :-1].reshape(-1, k), targets.logprobs[:, :-1].reshape(-1, k),
                                 targets.tail_mass[:, :-1].reshape(-1))
        elif self.weights["sta"] > 0 and views is not None and self.subvocab is not None and self.teacher is not None:
            teacher = self._exact_targets(views).to(h.device)
        elif self.weights["sta"] > 0 and t_out is not None:
            last = t_out.last_hidden_state[:, :-1].reshape(-1, t_out.last_hidden_state.shape[-1])
            teacher = _head_logits(last, self.teacher.head)
        kd = self.kd
        # forward() backpropagates w_sta * kd + w_hta * ce (times the trainer's 1 / tokens): the fused path
        # may then compute the head's gradient in its forward
        r = logit_losses(h, self.student.lm_head, labels, teacher, kd["kind"], kd["temperature"],
                         kd["chunk_size"], kd["beta"], kd["impl"],
                         loss_weights=(self.weights["sta"], self.weights["hta"]))
        return {"kd": r["kd_sum"], "ce": r["ce_sum"]}


    def _exact_targets(self, views: Any) -> torch.Tensor:
        """The teacher's exact next-student-token log-probs of the rows' positions but the last -> [N, V_s]."""
        from teachers.subvocab import exact_log_probs, floored

        lp = floored(exact_log_probs(self.teacher, self.subvocab, list(views), self.branch_floor))
        return lp[:, :-1].reshape(-1, lp.shape[-1])


def _head_logits(last: torch.Tensor, head: Callable[[torch.Tensor], torch.Tensor]) -> TeacherLogits:
    """The teacher's logits of token rows, made one chunk at a time: rows (slice) -> head(last[rows]) [n, V],
    from its last hidden states last [N, C_t] (online, or a hidden store's) and its head."""

    def teacher(rows: slice) -> torch.Tensor:
        return head(last[rows])

    return teacher


class _HeadInput:
    """What DistillObjective reads from a non-spiking student's forward: the input of its lm_head."""

    def __init__(self, head_input: torch.Tensor):
        self.head_input = head_input


_WEIGHT_OF = {"ea": "ea", "saa": "saa", "sfa": "sfa", "kd": "sta", "ce": "hta"}
