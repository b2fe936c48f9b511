"""Triton LIF scan: one program per (batch row, block of neurons), the time loop inside the kernel.

The forward stores nothing but its inputs; the backward re-runs the charge into a transient fp32 buffer of the
pre-spike membrane and then walks time backwards. Tested on CPU with TRITON_INTERPRET=1.
"""
import torch
import triton
import triton.language as tl

from ..surrogate import SURROGATES
from ..triton_common import surrogate_grad

BLOCK = 128


@triton.jit
def _lif_fwd(x_ptr, v0_ptr, s_ptr, vl_ptr, S, N, beta, gain, vth,
             HAS_V0: tl.constexpr, SOFT: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    b = tl.program_id(0)
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = n < N
    v = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_V0:
        v = tl.load(v0_ptr + b * N + n, mask=mask, other=0.0).to(tl.float32)
    for t in range(S):
        off = (b * S + t) * N + n
        h = beta * v + gain * tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        s = tl.where(h - vth >= 0.0, 1.0, 0.0)
        v = h - s * vth if SOFT else h * (1.0 - s)
        tl.store(s_ptr + off, s, mask=mask)
    tl.store(vl_ptr + b * N + n, v, mask=mask)


@triton.jit
def _lif_bwd(x_ptr, v0_ptr, gs_ptr, gvl_ptr, h_ptr, gx_ptr, gv0_ptr, S, N, beta, gain, vth, alpha,
             HAS_V0: tl.constexpr, HAS_GVL: tl.constexpr, SOFT: tl.constexpr, DETACH: tl.constexpr,
             SUR: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    b = tl.program_id(0)
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = n < N
    v = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_V0:
        v = tl.load(v0_ptr + b * N + n, mask=mask, other=0.0).to(tl.float32)
    for t in range(S):  # recompute the membrane into the scratch buffer
        off = (b * S + t) * N + n
        h = beta * v + gain * tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32)
        s = tl.where(h - vth >= 0.0, 1.0, 0.0)
        v = h - s * vth if SOFT else h * (1.0 - s)
        tl.store(h_ptr + off, h, mask=mask)
    gv = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_GVL:
        gv = tl.load(gvl_ptr + b * N + n, mask=mask, other=0.0)
    for i in range(S):
        off = (b * S + (S - 1 - i)) * N + n
        h = tl.load(h_ptr + off, mask=mask, other=0.0)
        xs = h - vth
        s = tl.where(xs >= 0.0, 1.0, 0.0)
        dv_dh = 1.0 if SOFT else 1.0 - s
        if DETACH:
            dv_ds = 0.0
        elif SOFT:
            dv_ds = -vth
        else:
            dv_ds = -h
        gs = tl.load(gs_ptr + off, mask=mask, other=0.0)
        gh = gv * dv_dh + (gs + gv * dv_ds) * surrogate_grad(xs, alpha, SUR)
        tl.store(gx_ptr + off, gh * gain, mask=mask)
        gv = gh * beta
    if HAS_V0:
        tl.store(gv0_ptr + b * N + n, gv, mask=mask)


class _LifScanTriton(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, v0, opts):
        B, S = x.shape[:2]
        xf = x.reshape(B, S, -1).contiguous()
        N = xf.shape[2]
        v0f = None if v0 is None else v0.reshape(B, N).float().contiguous()
        spikes = torch.empty(B, S, N, device=x.device, dtype=torch.float32)
        v_last = torch.empty(B, N, device=x.device, dtype=torch.float32)
        grid = (B, triton.cdiv(N, BLOCK))
        beta, gain, vth, soft = opts["fwd"]
        _lif_fwd[grid](xf, v0f if v0f is not None else xf, spikes, v_last, S, N, beta, gain, vth,
                       HAS_V0=v0f is not None, SOFT=bool(soft), BLOCK=BLOCK)  # fmt: skip
        ctx.save_for_backward(xf, v0f)
        ctx.opts, ctx.x_shape, ctx.x_dtype = opts, x.shape, x.dtype
        ctx.v0_dtype = None if v0 is None else v0.dtype
        return spikes.to(x.dtype).view(x.shape), v_last.view(x.shape[:1] + x.shape[2:])  # membrane stays fp32

    @staticmethod
    def backward(ctx, g_spikes, g_vlast):
        xf, v0f = ctx.saved_tensors
        B, S, N = xf.shape
        gs = torch.zeros(B, S, N, device=xf.device) if g_spikes is None else g_spikes.reshape(B, S, N).float()
        gs = gs.contiguous()
        gvl = None if g_vlast is None else g_vlast.reshape(B, N).float().contiguous()
        h = torch.empty(B, S, N, device=xf.device, dtype=torch.float32)
        gx = torch.empty(B, S, N, device=xf.device, dtype=torch.float32)
        gv0 = None if v0f is None else torch.empty_like(v0f)
        beta, gain, vth, soft, detach, sur, alpha = ctx.opts["bwd"]
        _lif_bwd[(B, triton.cdiv(N, BLOCK))](
            xf, v0f if v0f is not None else xf, gs, gvl if gvl is not None else gs, h, gx,
            gv0 if gv0 is not None else gx, S, N, beta, gain, vth, alpha,
            HAS_V0=v0f is not None, HAS_GVL=gvl is not None, SOFT=bool(soft), DETACH=bool(detach), SUR=sur,
            BLOCK=BLOCK,
        )  # fmt: skip
        gx = gx.to(ctx.x_dtype).view(ctx.x_shape)
        if gv0 is not None:
            gv0 = gv0.to(ctx.v0_dtype).view(ctx.x_shape[:1] + ctx.x_shape[2:])
        return gx, gv0, None


def lif_scan_triton(
    x: torch.Tensor,
    v0: torch.Tensor | None = None,
    *,
    tau: float = 2.0,
    v_threshold: float = 1.0,
    reset: str = "hard",
    decay_input: bool = True,
    detach_reset: bool = False,
    surrogate: str = "atan",
    alpha: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `lif_scan_reference`: x [B, S, *N], v0 [B, *N] -> (spikes [B, S, *N], v_last [B, *N]).

    fp32 arithmetic whatever x's dtype (bf16 allowed); spikes in x's dtype, the membrane v_last in fp32.
    """
    if reset not in ("hard", "soft"):
        raise ValueError(f"reset must be 'hard' or 'soft', got {reset!r}")
    if surrogate not in SURROGATES:
        raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")
    beta, gain, soft = 1.0 - 1.0 / tau, (1.0 / tau if decay_input else 1.0), int(reset == "soft")
    opts = {
        "fwd": (beta, gain, v_threshold, soft),
        "bwd": (beta, gain, v_threshold, soft, int(detach_reset), SURROGATES.index(surrogate), alpha),
    }
    return _LifScanTriton.apply(x, v0, opts)
