"""Fused, chunked LM head + KD + CE loss that never holds the full [N, V] logits, forward or backward.

`fused_head_kd_loss` is a drop-in for `pipeline.losses.chunked_logit_losses` (distill.kd.impl = "fused"): the
same per-token losses (`pipeline.losses.kd_loss` semantics, tau^2 scaled, sparse top-k targets as k buckets
plus one tail bucket), the same sums. Instead of autograd through log_softmax and the divergences it uses a
custom autograd Function: the forward computes the sums chunk by chunk and keeps only the head input and
weight; the backward recomputes each chunk's logits and writes the closed-form gradient
    dense:  d(tau^2 D)/dz_j = tau * p_j * r_j                  (p the tempered student softmax)
    sparse: d(tau^2 D)/dz_j = tau * e_b(j) * p_j / P_b(j)     (the targets are the teacher at temperature tau;
            P_b the tempered student's mass in bucket b(j) of token j, the k ids and one tail bucket, e_b = dD/du_b
            for bucket logits u with P = softmax(u); an id's share p_j / P_b is 1, a tail token's p_j / P_tail)
straight into grad_input and grad_weight. Peak memory is a few [chunk, V] buffers instead of a dozen [N, V].
The maths are fp32 whatever the input dtype, also inside an autocast region (mixed-precision training).
A callable teacher is called once per chunk in the forward and once more in the backward. On CPU each chunk's
rows go through the C row kernels (students/ops/csrc/spike_ops.cpp: kd_dense_rows, and kd_sparse_rows for
cached top-k targets, which sums the tail bucket in the same pass as CE's softmax); elsewhere
(CUDA, SPIKEDISTILL_KERNELS=reference) the same maths run as torch ops.

With `loss_weights=(w_kd, w_ce)` (the caller promises to backpropagate w_kd * kd_sum + w_ce * ce_sum times
any common scale) the gradients are computed in the forward instead: three head matmuls instead of four,
no second teacher call; the backward checks the promise and raises if it was broken.
"""
from __future__ import annotations

import math
from typing import Any

import torch

from pipeline.errors import ConfigError
from pipeline.kd_targets import IGNORE_INDEX, KD_KINDS, TAIL_FLOOR, is_sparse
from students.ops._dispatch import kernel_backend
from students.ops.csrc import library, ptr, threads


def fused_head_kd_loss(
    head_input: torch.Tensor,
    head_weight: torch.Tensor,
    labels: torch.Tensor,
    target: Any = None,
    kind: str = "forward_kl",
    temperature: float = 1.0,
    chunk_size: int = 1024,
    jsd_beta: float = 0.5,
    loss_weights: tuple[float, float] | None = None,
) -> dict[str, torch.Tensor]:
    """KD and CE sums of the head logits h W^T over tokens, without materialising [N, V].

    head_input: [N, C]; head_weight: [V, C] (a bias-free LM head); labels: [N] (IGNORE_INDEX = -100 rows count
    in neither loss); target: dense teacher logits [N, V], a callable rows (slice) -> logits [n, V], sparse
    targets (ids [N, k], logprobs [N, k], tail_mass [N]) or None (CE only, kd_sum = 0).
    loss_weights: optional (w_kd, w_ce) of the loss that will be backpropagated (see the module docstring).
    Returns {"kd_sum": scalar, "ce_sum": scalar, "n_tokens": int64 scalar}, differentiable in head_input and
    head_weight.
    """
    if kind not in KD_KINDS:
        raise ConfigError(f"distill.kd.kind must be one of {KD_KINDS}, got {kind!r}")
    if not 0.0 <= jsd_beta <= 1.0:
        raise ConfigError(f"distill.kd.jsd_beta must be in [0, 1], got {jsd_beta}")
    if chunk_size < 1:
        raise ConfigError(f"distill.kd.chunk_size must be >= 1, got {chunk_size}")
    if head_input.dim() != 2 or head_weight.dim() != 2 or head_input.shape[1] != head_weight.shape[1]:
        raise ValueError(
            f"fused_head_kd_loss: head_input [N, C] and head_weight [V, C] expected, got "
            f"{tuple(head_input.shape)} and {tuple(head_weight.shape)}"
        )
    vocab = head_weight.shape[0]
    if labels.shape != head_input.shape[:1] or bool(((labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))).any()):
        raise ValueError(
            f"fused_head_kd_loss: labels must be [N] = {tuple(head_input.shape[:1])} with ids in [0, {vocab}) or "
            f"{IGNORE_INDEX}; check the tokenizer matches the student's vocab_size"
        )
    if is_sparse(target):
        _check_sparse(target, head_input.shape[0], vocab)
    opts = _Opts(kind, float(temperature), int(chunk_size), float(jsd_beta), loss_weights)
    # fp32 maths under mixed precision too: autocast would run the chunks' head matmuls in bf16 / fp16
    with torch.autocast(head_input.device.type, enabled=False):
        kd_sum, ce_sum = _FusedHeadKD.apply(head_input, head_weight, labels, target, opts)
    return {"kd_sum": kd_sum, "ce_sum": ce_sum, "n_tokens": (labels != IGNORE_INDEX).sum()}


def _check_sparse(target: Any, n: int, vocab: int) -> None:
    """Sparse targets must be ids [N, k] in [0, V), logprobs [N, k], tail_mass [N] (the C rows index with ids)."""
    ids, logprobs, tail = target.ids, target.logprobs, target.tail_mass
    if ids.dim() != 2 or ids.shape[0] != n or logprobs.shape != ids.shape or tail.shape != ids.shape[:1]:
        raise ValueError(
            f"fused_head_kd_loss: sparse targets must be ids [N, k], logprobs [N, k], tail_mass [N] with N = {n}, "
            f"got {tuple(ids.shape)}, {tuple(logprobs.shape)}, {tuple(tail.shape)}"
        )
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab or ids.shape[1] > vocab):
        raise ValueError(
            f"fused_head_kd_loss: teacher top-k ids must lie in [0, {vocab}) with k <= {vocab}; the cache was "
            "built with another tokenizer (rerun the teacher_cache stage)"
        )


class _Opts:
    def __init__(self, kind: str, tau: float, chunk: int, beta: float, weights: tuple[float, float] | None):
        if kind == "jsd" and beta in (0.0, 1.0):
            kind = "forward_kl" if beta == 0.0 else "reverse_kl"  # same convention as pipeline.losses
        self.kind, self.tau, self.chunk, self.beta = kind, tau, chunk, beta
        self.weights = None if weights is None else (float(weights[0]), float(weights[1]))


class _FusedHeadKD(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, labels, target, opts):
        w32 = weight.float()
        eager = opts.weights is not None and any(ctx.needs_input_grad[:2])
        g_h = torch.empty_like(h) if eager and ctx.needs_input_grad[0] else None
        g_w = torch.zeros_like(w32) if eager and ctx.needs_input_grad[1] else None
        sums = torch.zeros(2, dtype=torch.float32, device=h.device)
        for rows in _chunks(h.shape[0], opts.chunk):
            h_c = h[rows].float()
            gk, gc = opts.weights if eager else (None, None)
            kd, ce, dz = _chunk(h_c, w32, labels[rows], _target_rows(target, rows), opts, eager, gk, gc)
            sums[0] += kd
            sums[1] += ce
            if eager:
                _accumulate(dz, h_c, w32, rows, g_h, g_w)
        if eager:
            ctx.save_for_backward(g_h, g_w)
        else:
            ctx.save_for_backward(h, weight)
        ctx.eager, ctx.labels, ctx.target, ctx.opts = eager, labels, target, opts
        ctx.dtypes = (h.dtype, weight.dtype)
        return sums[0].clone(), sums[1].clone()

    @staticmethod
    def backward(ctx, g_kd, g_ce):
        if ctx.eager:
            g_h, g_w = ctx.saved_tensors
            scale = _common_scale(g_kd, g_ce, ctx.opts.weights)
            g_h = None if g_h is None else g_h * scale
            g_w = None if g_w is None else (g_w * scale).to(ctx.dtypes[1])
            return g_h, g_w, None, None, None
        h, weight = ctx.saved_tensors
        w32 = weight.float()
        g_h = torch.empty_like(h) if ctx.needs_input_grad[0] else None
        g_w = torch.zeros_like(w32) if ctx.needs_input_grad[1] else None
        for rows in _chunks(h.shape[0], ctx.opts.chunk):
            h_c = h[rows].float()
            target = _target_rows(ctx.target, rows)
            _, _, dz = _chunk(h_c, w32, ctx.labels[rows], target, ctx.opts, True, g_kd, g_ce)
            _accumulate(dz, h_c, w32, rows, g_h, g_w)
        return g_h, (None if g_w is None else g_w.to(weight.dtype)), None, None, None


def _accumulate(dz, h_c, w32, rows, g_h, g_w):
    """Add one chunk's logit gradient dz [n, V] into grad_input [N, C] rows and grad_weight [V, C]."""
    if g_h is not None:
        g_h[rows] = (dz @ w32).to(g_h.dtype)
    if g_w is not None:
        g_w.addmm_(dz.t(), h_c)


def _common_scale(g_kd, g_ce, weights):
    """The s with (g_kd, g_ce) = s * (w_kd, w_ce); raises if the backward does not match loss_weights."""
    w = torch.tensor(weights, dtype=torch.float32, device=g_kd.device)
    g = torch.stack([g_kd.float(), g_ce.float()])
    s = (g * w).sum() / (w * w).sum().clamp_min(1e-30)
    if not torch.allclose(g, s * w, rtol=1e-5, atol=1e-12):
        raise RuntimeError(
            f"pipeline/fused_kd.py: loss_weights={weights} but the backward received d kd_sum={g_kd.item():.3g}, "
            f"d ce_sum={g_ce.item():.3g}; pass loss_weights matching the loss you backpropagate, or None"
        )
    return s


def _chunks(n: int, size: int):
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def _target_rows(target: Any, rows: slice) -> Any:
    """Teacher targets of token rows `rows`: dense logits [n, V] (fp32), (ids, logprobs, tail) or None."""
    if target is None:
        return None
    if is_sparse(target):
        return target.ids[rows].long(), target.logprobs[rows].float(), target.tail_mass[rows].float()
    with torch.no_grad():
        t = target[rows] if torch.is_tensor(target) else target(rows)
    n = len(range(*rows.indices(rows.stop)))
    if t.dim() != 2 or t.shape[0] != n:
        raise ValueError(f"fused_head_kd_loss: teacher logits for rows {rows} must be [{n}, V], got {tuple(t.shape)}")
    return t.float()


def _chunk(h_c, w32, labels, target, opts, want_grad, g_kd=None, g_ce=None):
    """(kd_sum, ce_sum, d loss / d logits [n, V] or None) for one chunk of rows."""
    z = h_c.float() @ w32.t()
    if target is not None and not isinstance(target, tuple) and target.shape[1] != z.shape[1]:
        raise ValueError(
            f"fused_head_kd_loss: teacher vocab {target.shape[1]} != student vocab {z.shape[1]}; distill only "
            "between models sharing a tokenizer (teachers.check_vocab)"
        )
    lib = _cpu_library(z)
    if lib is not None:
        return _chunk_cpu(lib, z, labels, target, opts, want_grad, g_kd, g_ce)
    valid = labels != IGNORE_INDEX
    safe_labels = labels.clamp_min(0).unsqueeze(1)
    # cross-entropy with ignored rows masked out
    lse = torch.logsumexp(z, dim=1, keepdim=True)
    ce = ((lse - z.gather(1, safe_labels)).squeeze(1) * valid).sum()
    kd = z.new_zeros(())
    dz = None
    if target is not None:
        kd_rows, dz_kd = _kd_rows(z, _neutral_ignored_rows(target, valid), opts, want_grad)
        kd = (kd_rows * valid).sum() * opts.tau**2
        if want_grad:
            dz = dz_kd.mul_(g_kd * opts.tau * valid.unsqueeze(1))
    if want_grad:
        # d ce / dz = softmax(z) - onehot(label), zero on ignored rows
        d_ce = (z - lse).exp_().scatter_add_(1, safe_labels, -torch.ones_like(lse))
        d_ce.mul_(g_ce * valid.unsqueeze(1))
        dz = d_ce if dz is None else dz.add_(d_ce)
    return kd, ce, dz


def _neutral_ignored_rows(target, valid):
    """The target with the rows of ignored labels replaced by a uniform teacher, so they hold no NaN or inf."""
    if bool(valid.all()):
        return target
    keep = valid.unsqueeze(1)
    if isinstance(target, tuple):
        ids, logprobs, tail = target
        return ids, logprobs.where(keep, 0.0), tail.where(valid, 1.0)
    return target.where(keep, 0.0)


def _cpu_library(z):
    """The fused C row kernel (students/ops/csrc) for CPU logits, or None (then plain torch runs)."""
    if z.device.type != "cpu" or kernel_backend(z.device) == "reference":
        return None
    return library()


def _chunk_cpu(lib, z, labels, target, opts, want_grad, g_kd, g_ce):
    """_chunk on CPU: one fused C pass per row (dense, sparse or no target), the gradient written over z."""
    labels = labels.long().contiguous()
    kd_rows, ce_rows = torch.empty(z.shape[0]), torch.empty(z.shape[0])
    kind = KD_KINDS.index(opts.kind)
    g_kd, g_ce = (float(g_kd), float(g_ce)) if want_grad else (0.0, 0.0)
    if isinstance(target, tuple):
        ids, logprobs, tail = (t.contiguous() for t in target)
        lib.kd_sparse_rows(
            ptr(z), ids.data_ptr(), ptr(logprobs), ptr(tail), labels.data_ptr(), z.shape[0], z.shape[1],
            ids.shape[1], kind, opts.tau, opts.beta, g_kd, g_ce, int(want_grad), ptr(kd_rows), ptr(ce_rows),
            threads(),
        )  # fmt: skip
    else:
        lib.kd_dense_rows(
            ptr(z), ptr(None if target is None else target.contiguous()), labels.data_ptr(), z.shape[0],
            z.shape[1], kind, opts.tau, opts.beta, g_kd, g_ce, int(want_grad), ptr(kd_rows), ptr(ce_rows),
            threads(),
        )  # fmt: skip
    return kd_rows.sum(), ce_rows.sum(), (z if want_grad else None)


def _kd_rows(z, target, opts, want_grad):
    """Per-row divergence D [n] of the student logits z [n, V] from the target at temperature tau, and
    d D / d (z / tau)."""
    if isinstance(target, tuple):
        return _sparse_kd_rows(z, target, opts, want_grad)
    log_p = torch.log_softmax(z / opts.tau, dim=1)
    div, coef = _bucket_divergence(log_p, torch.log_softmax(target / opts.tau, dim=1), opts.kind, opts.beta,
                                   want_grad)
    if not want_grad:
        return div, None
    # per-token gradient dD/ds_j = p_j r_j, or for forward KL p_j - exp(log p_j + log q_j - log p_j)
    p = log_p.exp()
    if opts.kind == "forward_kl":
        # no p > 0 mask here: where p underflows to 0 the gradient is -q, which may be far from 0
        return div, p - (log_p + coef).exp()
    return div, (p * coef).where(p > 0, 0.0)


def _sparse_kd_rows(z, target, opts, want_grad):
    """_kd_rows for sparse targets (ids, logprobs, tail) of the teacher at temperature tau: pipeline.losses.
    _sparse_buckets' semantics. The student's tempered softmax p = softmax(z / tau) over the full row is taken
    onto the k ids and the tail bucket (log P_b); with e_b = dD/d(log P_b) minus P_b times their sum (P_b - Q_b
    for forward KL, P_b c_b otherwise), d D / d (z_j / tau) = e_b(j) p_j / P_b(j): e_i on an id, e_tail's
    share p_j / P_tail on a tail token."""
    ids, logprobs, tail = target
    # shifted by the row maximum before dividing, so a small tau does not scale the logits' rounding error
    log_p = torch.log_softmax((z - z.amax(dim=1, keepdim=True)) / opts.tau, dim=1)
    log_pb = log_p.gather(1, ids)
    has_tail = ids.shape[1] < z.shape[1]
    log_q = logprobs
    if has_tail:
        log_pb = torch.cat([log_pb, torch.logsumexp(log_p.scatter(1, ids, float("-inf")), dim=1, keepdim=True)], 1)
        log_q = torch.cat([logprobs, tail.clamp_min(TAIL_FLOOR).log().unsqueeze(1)], dim=1)
    log_qb = torch.log_softmax(log_q, dim=1)
    div, coef = _bucket_divergence(log_pb, log_qb, opts.kind, opts.beta, want_grad)
    if not want_grad:
        return div, None
    e = log_pb.exp() - log_qb.exp() if opts.kind == "forward_kl" else log_pb.exp() * coef
    k = ids.shape[1]
    if has_tail:
        # tail tokens: e_tail * p_j / P_tail; 0 where the tail holds no mass at all
        grad = e[:, k:] * (log_p - log_pb[:, k:]).exp().nan_to_num(0.0)
    else:
        grad = torch.zeros_like(z)
    return div, grad.scatter_(1, ids, 0.0).scatter_add_(1, ids, e[:, :k])


def _weighted(terms, log_w):
    """sum exp(log_w) * terms over the last axis, 0 where the weight is 0 (pipeline.losses semantics)."""
    w = log_w.exp()
    return torch.where(w > 0, w * terms, 0.0).sum(-1)


def _bucket_divergence(log_p, log_q, kind, beta, want_grad):
    """D [n] between bucket distributions and the per-bucket gradient coefficient [n, K] (None if not wanted).

    Coefficient r with dD/ds_j = p_j r_b(j): reverse KL r = log P - log Q - D; JSD r = G - sum P G with
    G = (1 - beta)(log P - log M); forward KL returns log Q - log P (used in the stable form by the caller).
    """
    if kind == "forward_kl":
        div = _weighted(log_q - log_p, log_q)
        return div, (log_q - log_p if want_grad else None)
    if kind == "reverse_kl":
        div = _weighted(log_p - log_q, log_p)
        return div, (log_p - log_q - div.unsqueeze(1) if want_grad else None)
    log_m = torch.logaddexp(log_q + math.log(beta), log_p + math.log(1.0 - beta))
    div = beta * _weighted(log_q - log_m, log_q) + (1.0 - beta) * _weighted(log_p - log_m, log_p)
    if not want_grad:
        return div, None
    g = (1.0 - beta) * (log_p - log_m)
    return div, g - _weighted(g, log_p).unsqueeze(1)
