"""Triton WKV: one program per (batch row, block of channels), the time loop inside the kernel, fp32 state.

Same maths as the C path (students/ops/csrc/spike_ops.cpp): running-max forward, and a backward whose adjoints
are scaled by e^{p_t} so every factor is exp of a non-positive number at any length. The backward first
re-runs the forward into a transient buffer of states, then walks time backwards. bf16 k, v are read as fp32.
Tested on CPU with TRITON_INTERPRET=1.
"""
import torch
import triton
import triton.language as tl

from .reference import MAX_DECAY_EXP, decay_rate

BLOCK = 64
NEG_INF = -1e38


@triton.jit
def _wkv_fwd(w_ptr, u_ptr, k_ptr, v_ptr, num0_ptr, den0_ptr, p0_ptr, y_ptr, num1_ptr, den1_ptr, p1_ptr,
             L, C, HAS_STATE: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = c < C
    w = tl.load(w_ptr + c, mask=mask, other=0.0)
    u = tl.load(u_ptr + c, mask=mask, other=0.0)
    num = tl.zeros([BLOCK], dtype=tl.float32)
    den = tl.zeros([BLOCK], dtype=tl.float32)
    p = tl.full([BLOCK], -1e38, dtype=tl.float32)
    if HAS_STATE:
        num = tl.load(num0_ptr + b * C + c, mask=mask, other=0.0)
        den = tl.load(den0_ptr + b * C + c, mask=mask, other=0.0)
        p = tl.load(p0_ptr + b * C + c, mask=mask, other=-1e38)
    for t in range(L):
        off = (b * L + t) * C + c
        kt = tl.load(k_ptr + off, mask=mask, other=0.0).to(tl.float32)
        vt = tl.load(v_ptr + off, mask=mask, other=0.0).to(tl.float32)
        uk = u + kt
        q = tl.maximum(p, uk)
        e1 = tl.exp(p - q)
        e2 = tl.exp(uk - q)
        tl.store(y_ptr + off, (e1 * num + e2 * vt) / (e1 * den + e2), mask=mask)
        pw = p + w
        q = tl.maximum(pw, kt)
        e1 = tl.exp(pw - q)
        e2 = tl.exp(kt - q)
        num = e1 * num + e2 * vt
        den = e1 * den + e2
        p = q
    tl.store(num1_ptr + b * C + c, num, mask=mask)
    tl.store(den1_ptr + b * C + c, den, mask=mask)
    tl.store(p1_ptr + b * C + c, p, mask=mask)


@triton.jit
def _wkv_bwd(w_ptr, u_ptr, k_ptr, v_ptr, num0_ptr, den0_ptr, p0_ptr, gy_ptr, gnum1_ptr, gden1_ptr, gp1_ptr,
             st_ptr, gk_ptr, gv_ptr, gw_ptr, gu_ptr, gnum0_ptr, gden0_ptr, gp0_ptr, L, C,
             HAS_STATE: tl.constexpr, HAS_GSTATE: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    b = tl.program_id(0)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = c < C
    w = tl.load(w_ptr + c, mask=mask, other=0.0)
    u = tl.load(u_ptr + c, mask=mask, other=0.0)
    num = tl.zeros([BLOCK], dtype=tl.float32)
    den = tl.zeros([BLOCK], dtype=tl.float32)
    p = tl.full([BLOCK], -1e38, dtype=tl.float32)
    if HAS_STATE:
        num = tl.load(num0_ptr + b * C + c, mask=mask, other=0.0)
        den = tl.load(den0_ptr + b * C + c, mask=mask, other=0.0)
        p = tl.load(p0_ptr + b * C + c, mask=mask, other=-1e38)
    num_in = num
    den_in = den
    # states before each step, [3, B, L, C] scratch
    plane = L * C * tl.num_programs(0)
    for t in range(L):
        off = (b * L + t) * C + c
        tl.store(st_ptr + off, num, mask=mask)
        tl.store(st_ptr + plane + off, den, mask=mask)
        tl.store(st_ptr + 2 * plane + off, p, mask=mask)
        kt = tl.load(k_ptr + off, mask=mask, other=0.0).to(tl.float32)
        vt = tl.load(v_ptr + off, mask=mask, other=0.0).to(tl.float32)
        pw = p + w
        q = tl.maximum(pw, kt)
        e1 = tl.exp(pw - q)
        e2 = tl.exp(kt - q)
        num = e1 * num + e2 * vt
        den = e1 * den + e2
        p = q
    ga = tl.zeros([BLOCK], dtype=tl.float32)
    gb = tl.zeros([BLOCK], dtype=tl.float32)
    gp = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_GSTATE:
        ga = tl.load(gnum1_ptr + b * C + c, mask=mask, other=0.0)
        gb = tl.load(gden1_ptr + b * C + c, mask=mask, other=0.0)
        gp = tl.load(gp1_ptr + b * C + c, mask=mask, other=0.0) - ga * num - gb * den
    gw = tl.zeros([BLOCK], dtype=tl.float32)
    gu = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(L):
        t = L - 1 - i
        off = (b * L + t) * C + c
        num = tl.load(st_ptr + off, mask=mask, other=0.0)
        den = tl.load(st_ptr + plane + off, mask=mask, other=0.0)
        p = tl.load(st_ptr + 2 * plane + off, mask=mask, other=0.0)
        kt = tl.load(k_ptr + off, mask=mask, other=0.0).to(tl.float32)
        vt = tl.load(v_ptr + off, mask=mask, other=0.0).to(tl.float32)
        uk = u + kt
        q = tl.maximum(p, uk)
        a1 = tl.exp(p - q)
        a2 = tl.exp(uk - q)
        dq = a1 * den + a2
        yt = (a1 * num + a2 * vt) / dq
        gyd = tl.load(gy_ptr + off, mask=mask, other=0.0) / dq
        pw = p + w
        q = tl.maximum(pw, kt)
        b1 = tl.exp(pw - q)
        b2 = tl.exp(kt - q)
        tl.store(gv_ptr + off, gyd * a2 + ga * b2, mask=mask)
        # vt - yt = a1 (vt den - num) / dq: no cancellation when e^{u + k} dominates (large time_first)
        gu_t = gyd * a2 * a1 * (vt * den - num) / dq
        gk = gu_t + (ga * vt + gb) * b2
        gu += gu_t
        gw += (ga * num + gb * den) * b1
        keep = tl.where(pw >= kt, 1.0, 0.0)
        gw += keep * gp
        gk += (1.0 - keep) * gp
        gp = gp * keep
        tl.store(gk_ptr + off, gk, mask=mask)
        ga = gyd * a1 + ga * b1
        gb = -gyd * yt * a1 + gb * b1
    tl.store(gw_ptr + b * C + c, gw, mask=mask)
    tl.store(gu_ptr + b * C + c, gu, mask=mask)
    if HAS_STATE:
        tl.store(gnum0_ptr + b * C + c, ga, mask=mask)
        tl.store(gden0_ptr + b * C + c, gb, mask=mask)
        tl.store(gp0_ptr + b * C + c, gp + ga * num_in + gb * den_in, mask=mask)


def _f32(t):
    return None if t is None else t.float().contiguous()


class _WkvTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, time_decay, time_first, k, v, num0, den0, p0):
        B, L, C = k.shape
        w = decay_rate(time_decay).contiguous()
        u, kc, vc = _f32(time_first), k.contiguous(), v.contiguous()
        num0, den0, p0 = _f32(num0), _f32(den0), _f32(p0)
        y = torch.empty(B, L, C, device=k.device, dtype=torch.float32)
        num1, den1, p1 = (torch.empty(B, C, device=k.device, dtype=torch.float32) for _ in range(3))
        has_state = num0 is not None
        _wkv_fwd[(B, triton.cdiv(C, BLOCK))](
            w, u, kc, vc, num0 if has_state else w, den0 if has_state else w, p0 if has_state else w,
            y, num1, den1, p1, L, C, HAS_STATE=has_state, BLOCK=BLOCK,
        )  # fmt: skip
        ctx.save_for_backward(w, u, kc, vc, num0, den0, p0)
        ctx.dtypes = (time_decay.dtype, time_first.dtype, k.dtype, v.dtype)
        ctx.decay_clamped = time_decay.detach() > MAX_DECAY_EXP  # where the clamp passes no gradient
        return y.to(k.dtype), num1, den1, p1

    @staticmethod
    def backward(ctx, g_y, g_num1, g_den1, g_p1):
        w, u, kc, vc, num0, den0, p0 = ctx.saved_tensors
        B, L, C = kc.shape
        dev = kc.device
        g_y = torch.zeros(B, L, C, device=dev) if g_y is None else _f32(g_y)
        has_g = any(g is not None for g in (g_num1, g_den1, g_p1))
        g_num1, g_den1, g_p1 = (torch.zeros(B, C, device=dev) if g is None else _f32(g)
                                for g in (g_num1, g_den1, g_p1))  # fmt: skip
        scratch = torch.empty(3, B, L, C, device=dev, dtype=torch.float32)
        g_k, g_v = torch.empty(B, L, C, device=dev), torch.empty(B, L, C, device=dev)
        g_w, g_u = torch.empty(B, C, device=dev), torch.empty(B, C, device=dev)
        has_state = num0 is not None
        g_state = [torch.empty(B, C, device=dev) if has_state else None for _ in range(3)]
        _wkv_bwd[(B, triton.cdiv(C, BLOCK))](
            w, u, kc, vc, num0 if has_state else w, den0 if has_state else w, p0 if has_state else w,
            g_y, g_num1, g_den1, g_p1, scratch, g_k, g_v, g_w, g_u,
            *(g if g is not None else g_w for g in g_state), L, C,
            HAS_STATE=has_state, HAS_GSTATE=has_g, BLOCK=BLOCK,
        )  # fmt: skip
        td_dtype, tf_dtype, k_dtype, v_dtype = ctx.dtypes
        # w = -exp(time_decay), so d/d time_decay = d/dw * w (0 where decay_rate clamped time_decay)
        g_td = (g_w.sum(0) * w).masked_fill(ctx.decay_clamped, 0.0).to(td_dtype)
        return (g_td, g_u.sum(0).to(tf_dtype), g_k.to(k_dtype), g_v.to(v_dtype), *g_state)


def wkv_triton(time_decay, time_first, k, v, state=None):
    """Same contract as `wkv_reference`: w, u [C]; k, v [B, L, C] (fp32 or bf16) -> (y [B, L, C], state).

    Gradients flow to time_decay, time_first, k, v and, when given, the incoming state (num, den, max_exp).
    """
    num0, den0, p0 = (None, None, None) if state is None else state
    y, num1, den1, p1 = _WkvTriton.apply(time_decay, time_first, k, v, num0, den0, p0)
    return y, (num1, den1, p1)
