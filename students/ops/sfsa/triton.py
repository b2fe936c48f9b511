"""Triton SFSA: binary Q K^T, causal mask, threshold and A V fused per block of query rows.

Forward: one program per (batch*head, block of rows) walks the key blocks up to the diagonal, thresholds the
scores, writes the binary map and accumulates A V. Backward (surrogate through the threshold), two kernels
that recompute the scores instead of storing them: per row block dQ and the threshold gradient, per key block
dK and dV. Dots run in full fp32 precision (input_precision="ieee"). Tested with TRITON_INTERPRET=1.
"""
import torch
import triton
import triton.language as tl

from ..surrogate import SURROGATES
from ..triton_common import surrogate_grad

BLOCK = 16


@triton.jit
def _sfsa_fwd(q_ptr, k_ptr, v_ptr, th_ptr, o_ptr, a_ptr, L, D: tl.constexpr, BLOCK: tl.constexpr):
    bh = tl.program_id(0)
    rows = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, D)
    base = bh * L * D
    th = tl.load(th_ptr + bh)
    q = tl.load(q_ptr + base + rows[:, None] * D + d[None, :], mask=rows[:, None] < L, other=0.0)
    acc = tl.zeros([BLOCK, D], dtype=tl.float32)
    for j0 in range(0, (tl.program_id(1) + 1) * BLOCK, BLOCK):
        cols = j0 + tl.arange(0, BLOCK)
        cmask = cols[:, None] < L
        k = tl.load(k_ptr + base + cols[:, None] * D + d[None, :], mask=cmask, other=0.0)
        v = tl.load(v_ptr + base + cols[:, None] * D + d[None, :], mask=cmask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
        keep = (cols[None, :] <= rows[:, None]) & (s - th >= 0.0)
        a = tl.where(keep, 1.0, 0.0)
        tl.store(a_ptr + bh * L * L + rows[:, None] * L + cols[None, :], a,
                 mask=(rows[:, None] < L) & (cols[None, :] < L))  # fmt: skip
        acc += tl.dot(a, v, input_precision="ieee")
    tl.store(o_ptr + base + rows[:, None] * D + d[None, :], acc, mask=rows[:, None] < L)


@triton.jit
def _score_grad(q, k, v, do, ga_ptr, rows, cols, th, alpha, L, HAS_GA: tl.constexpr, SUR: tl.constexpr):
    """Recomputed scores' gradient g_S and binary map A of one [BLOCK, BLOCK] tile."""
    s = tl.dot(q, tl.trans(k), input_precision="ieee")
    causal = (cols[None, :] <= rows[:, None]) & (cols[None, :] < L) & (rows[:, None] < L)
    g = tl.dot(do, tl.trans(v), input_precision="ieee")
    if HAS_GA:
        g += tl.load(ga_ptr + rows[:, None] * L + cols[None, :], mask=causal, other=0.0)
    gs = tl.where(causal, g * surrogate_grad(s - th, alpha, SUR), 0.0)
    a = tl.where(causal & (s - th >= 0.0), 1.0, 0.0)
    return gs, a


@triton.jit
def _sfsa_bwd_q(q_ptr, k_ptr, v_ptr, do_ptr, ga_ptr, th_ptr, dq_ptr, dth_ptr, L, alpha,
                D: tl.constexpr, BLOCK: tl.constexpr, HAS_GA: tl.constexpr, SUR: tl.constexpr):  # fmt: skip
    bh = tl.program_id(0)
    rb = tl.program_id(1)
    rows = rb * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, D)
    base = bh * L * D
    th = tl.load(th_ptr + bh)
    rmask = rows[:, None] < L
    q = tl.load(q_ptr + base + rows[:, None] * D + d[None, :], mask=rmask, other=0.0)
    do = tl.load(do_ptr + base + rows[:, None] * D + d[None, :], mask=rmask, other=0.0)
    dq = tl.zeros([BLOCK, D], dtype=tl.float32)
    dth = tl.zeros([BLOCK], dtype=tl.float32)
    for j0 in range(0, (rb + 1) * BLOCK, BLOCK):
        cols = j0 + tl.arange(0, BLOCK)
        cmask = cols[:, None] < L
        k = tl.load(k_ptr + base + cols[:, None] * D + d[None, :], mask=cmask, other=0.0)
        v = tl.load(v_ptr + base + cols[:, None] * D + d[None, :], mask=cmask, other=0.0)
        gs, _a = _score_grad(q, k, v, do, ga_ptr + bh * L * L, rows, cols, th, alpha, L, HAS_GA, SUR)
        dq += tl.dot(gs, k, input_precision="ieee")
        dth -= tl.sum(gs, axis=1)
    tl.store(dq_ptr + base + rows[:, None] * D + d[None, :], dq, mask=rmask)
    tl.store(dth_ptr + bh * L + rows, dth, mask=rows < L)


@triton.jit
def _sfsa_bwd_kv(q_ptr, k_ptr, v_ptr, do_ptr, ga_ptr, th_ptr, dk_ptr, dv_ptr, L, alpha,
                 D: tl.constexpr, BLOCK: tl.constexpr, HAS_GA: tl.constexpr, SUR: tl.constexpr):  # fmt: skip
    bh = tl.program_id(0)
    cb = tl.program_id(1)
    cols = cb * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, D)
    base = bh * L * D
    th = tl.load(th_ptr + bh)
    cmask = cols[:, None] < L
    k = tl.load(k_ptr + base + cols[:, None] * D + d[None, :], mask=cmask, other=0.0)
    v = tl.load(v_ptr + base + cols[:, None] * D + d[None, :], mask=cmask, other=0.0)
    dk = tl.zeros([BLOCK, D], dtype=tl.float32)
    dv = tl.zeros([BLOCK, D], dtype=tl.float32)
    for i0 in range(cb * BLOCK, L, BLOCK):
        rows = i0 + tl.arange(0, BLOCK)
        rmask = rows[:, None] < L
        q = tl.load(q_ptr + base + rows[:, None] * D + d[None, :], mask=rmask, other=0.0)
        do = tl.load(do_ptr + base + rows[:, None] * D + d[None, :], mask=rmask, other=0.0)
        gs, a = _score_grad(q, k, v, do, ga_ptr + bh * L * L, rows, cols, th, alpha, L, HAS_GA, SUR)
        dk += tl.dot(tl.trans(gs), q, input_precision="ieee")
        dv += tl.dot(tl.trans(a), do, input_precision="ieee")
    tl.store(dk_ptr + base + cols[:, None] * D + d[None, :], dk, mask=cmask)
    tl.store(dv_ptr + base + cols[:, None] * D + d[None, :], dv, mask=cmask)


def _padded(t: torch.Tensor, D: int) -> torch.Tensor:
    """[B, H, L, d] -> contiguous fp32 [B*H, L, D] with zero columns up to D (a power of two >= 16)."""
    B, H, L, d = t.shape
    return torch.nn.functional.pad(t.float(), (0, D - d)).reshape(B * H, L, D).contiguous()


class _SfsaTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, theta, surrogate, alpha):
        B, H, L, d = q.shape
        D = max(16, triton.next_power_of_2(d))
        qp, kp, vp = _padded(q, D), _padded(k, D), _padded(v, D)
        th = (theta.detach().float().view(1, -1) if theta.dim() == 1 else theta.detach().float().view(1, 1))
        th = th.expand(B, H).contiguous().view(-1)
        out = torch.empty(B * H, L, D, device=q.device, dtype=torch.float32)
        attn = torch.zeros(B * H, L, L, device=q.device, dtype=torch.float32)
        _sfsa_fwd[(B * H, triton.cdiv(L, BLOCK))](qp, kp, vp, th, out, attn, L, D=D, BLOCK=BLOCK)
        ctx.save_for_backward(qp, kp, vp, th, theta)
        ctx.meta = (B, H, L, d, D, SURROGATES.index(surrogate), alpha, q.dtype, k.dtype, v.dtype)
        out = out[..., :d].reshape(B, H, L, d).to(q.dtype)
        return out, attn.view(B, H, L, L).to(q.dtype)

    @staticmethod
    def backward(ctx, g_out, g_attn):
        qp, kp, vp, th, theta = ctx.saved_tensors
        B, H, L, d, D, sur, alpha, q_dtype, k_dtype, v_dtype = ctx.meta
        dev = qp.device
        do = torch.zeros(B * H, L, D, device=dev) if g_out is None else _padded(g_out, D)
        ga = None if g_attn is None else g_attn.float().reshape(B * H, L, L).contiguous()
        dq, dk, dv = (torch.empty(B * H, L, D, device=dev) for _ in range(3))
        dth_rows = torch.empty(B * H, L, device=dev)
        grid = (B * H, triton.cdiv(L, BLOCK))
        common = {"D": D, "BLOCK": BLOCK, "HAS_GA": ga is not None, "SUR": sur}
        ga_arg = ga if ga is not None else do
        _sfsa_bwd_q[grid](qp, kp, vp, do, ga_arg, th, dq, dth_rows, L, alpha, **common)
        _sfsa_bwd_kv[grid](qp, kp, vp, do, ga_arg, th, dk, dv, L, alpha, **common)

        def back(t, dtype):
            return t[..., :d].reshape(B, H, L, d).to(dtype)

        g_theta = dth_rows.view(B, H, L).sum(-1)
        g_theta = (g_theta.sum(0) if theta.dim() == 1 else g_theta.sum()).to(theta.dtype).view_as(theta)
        return back(dq, q_dtype), back(dk, k_dtype), back(dv, v_dtype), g_theta, None, None


def sfsa_triton(q, k, v, threshold, *, surrogate: str = "atan", alpha: float = 2.0):
    """Same contract as `sfsa_reference`: q, k, v [B, H, L, D]; threshold scalar or [H] (> 0).

    Returns (out [B, H, L, D], attn [B, H, L, L]) in q's dtype; gradients reach q, k, v and a tensor threshold.
    """
    if surrogate not in SURROGATES:
        raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")
    theta = torch.as_tensor(threshold, dtype=q.dtype, device=q.device)  # the reference compares in q's dtype
    return _SfsaTriton.apply(q, k, v, theta, surrogate, alpha)
