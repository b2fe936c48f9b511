"""Fused CPU WKV: one C loop over time per block of channels, fp32 state, any length.

The forward stores nothing but its inputs; the backward recomputes the states of a channel block into a
small per-thread buffer and runs the scaled adjoint recurrence backwards (see spike_ops.cpp: wkv_backward).
"""
import torch

from ..csrc import library, ptr, threads
from .reference import MAX_DECAY_EXP, decay_rate

State = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float().contiguous()


class _Wkv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, time_decay, time_first, k, v, num0, den0, p0):
        B, L, C = k.shape
        w = decay_rate(time_decay).contiguous()
        u, kf, vf = _f32(time_first), _f32(k), _f32(v)
        num0, den0, p0 = _f32(num0), _f32(den0), _f32(p0)
        y = torch.empty(B, L, C, dtype=torch.float32)
        num1, den1, p1 = (torch.empty(B, C, dtype=torch.float32) for _ in range(3))
        library().wkv_forward(
            ptr(w), ptr(u), ptr(kf), ptr(vf), ptr(num0), ptr(den0), ptr(p0),
            ptr(y), ptr(num1), ptr(den1), ptr(p1), B, L, C, threads(),
        )  # fmt: skip
        ctx.save_for_backward(w, u, kf, vf, num0, den0, p0)
        ctx.dtypes = (time_decay.dtype, time_first.dtype, k.dtype, v.dtype)
        ctx.decay_clamped = time_decay.detach() > MAX_DECAY_EXP  # where the clamp passes no gradient
        return y.to(k.dtype), num1, den1, p1

    @staticmethod
    def backward(ctx, g_y, g_num1, g_den1, g_p1):
        w, u, kf, vf, num0, den0, p0 = ctx.saved_tensors
        B, L, C = kf.shape
        g_y = torch.zeros_like(kf) if g_y is None else _f32(g_y)
        g_num1, g_den1, g_p1 = _f32(g_num1), _f32(g_den1), _f32(g_p1)
        g_k, g_v = torch.empty_like(kf), torch.empty_like(vf)
        g_w, g_u = torch.empty(B, C), torch.empty(B, C)
        has_state = num0 is not None
        g_state = [torch.empty(B, C) if has_state else None for _ in range(3)]
        library().wkv_backward(
            ptr(w), ptr(u), ptr(kf), ptr(vf), ptr(num0), ptr(den0), ptr(p0),
            ptr(g_y), ptr(g_num1), ptr(g_den1), ptr(g_p1), ptr(g_k), ptr(g_v), ptr(g_w), ptr(g_u),
            *(ptr(g) for g in g_state), B, L, C, threads(),
        )  # fmt: skip
        td_dtype, tf_dtype, k_dtype, v_dtype = ctx.dtypes
        # w = -exp(time_decay), so d/d time_decay = d/dw * w (0 where decay_rate clamped time_decay)
        g_td = (g_w.sum(0) * w).masked_fill(ctx.decay_clamped, 0.0).to(td_dtype)
        return (g_td, g_u.sum(0).to(tf_dtype), g_k.to(k_dtype), g_v.to(v_dtype), *g_state)


def wkv_cpu(
    time_decay: torch.Tensor,
    time_first: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: State | None = None,
) -> tuple[torch.Tensor, State]:
    """Same contract as `wkv_reference`: w, u [C]; k, v [B, L, C] -> (y [B, L, C] in k's dtype, state).

    Gradients flow to time_decay, time_first, k, v and, when given, the incoming state (num, den, max_exp).
    """
    num0, den0, p0 = (None, None, None) if state is None else state
    y, num1, den1, p1 = _Wkv.apply(time_decay, time_first, k, v, num0, den0, p0)
    return y, (num1, den1, p1)
