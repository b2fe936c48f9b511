"""Triton LIF scan: one program per (batch row, block of neurons), the time loop inside the kernel.

The forward stores nothing but its inputs; the backward re-runs the charge into a transient fp32 buffer of the
pre-spike membrane and then walks time backwards. Tested on CPU with TRITON_INTERPRET=1.

The charge is spikingjelly's, rounded as PyTorch rounds it (reference.charge): the quotient by tau is the IEEE
division (div_rn; a plain `/` may compile to an approximate division), and the kernels are compiled without
multiply-add fusion (enable_fp_fusion=False), so V * beta + X rounds twice, as the reference does. float64 never
comes here: Triton passes Python floats (tau, the threshold) as float32 scalars, so the dispatch runs float64 in
the reference.
"""
import torch
import triton
import triton.language as tl

from ..surrogate import SURROGATES
from ..triton_common import surrogate_grad
from .reference import charge_constants

BLOCK = 128


@triton.jit
def _charge(v, x, tau, beta, DECAY: tl.constexpr):
    """reference.charge: V + (X - V) / tau (DECAY) or V * beta + X, beta = float32(1 - 1/tau)."""
    if DECAY:
        return v + tl.math.div_rn(x - v, tau)
    return v * beta + x


@triton.jit
def _lif_fwd(x_ptr, v0_ptr, s_ptr, vl_ptr, S, N, tau, beta, vth,
             HAS_V0: tl.constexpr, DECAY: tl.constexpr, SOFT: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    b = tl.program_id(0)
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = n < N
    v = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_V0:
        v = tl.load(v0_ptr + b * N + n, mask=mask, other=0.0).to(tl.float32)
    for t in range(S):
        off = (b * S + t) * N + n
        h = _charge(v, tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32), tau, beta, DECAY)
        s = tl.where(h - vth >= 0.0, 1.0, 0.0)
        v = h - s * vth if SOFT else h * (1.0 - s)
        tl.store(s_ptr + off, s, mask=mask)
    tl.store(vl_ptr + b * N + n, v, mask=mask)


@triton.jit
def _lif_bwd(x_ptr, v0_ptr, gs_ptr, gvl_ptr, h_ptr, gx_ptr, gv0_ptr, S, N, tau, beta, vth, alpha,
             HAS_V0: tl.constexpr, HAS_GVL: tl.constexpr, DECAY: tl.constexpr, SOFT: tl.constexpr,
             DETACH: tl.constexpr, SUR: tl.constexpr, BLOCK: tl.constexpr):  # fmt: skip
    b = tl.program_id(0)
    n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = n < N
    v = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_V0:
        v = tl.load(v0_ptr + b * N + n, mask=mask, other=0.0).to(tl.float32)
    for t in range(S):  # recompute the membrane into the scratch buffer
        off = (b * S + t) * N + n
        h = _charge(v, tl.load(x_ptr + off, mask=mask, other=0.0).to(tl.float32), tau, beta, DECAY)
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
        if DECAY:  # the charge's derivatives as autograd forms them: d/dX = 1/tau, d/dV = 1 - 1/tau
            gx = tl.math.div_rn(gh, tau)
            gv = gh - gx
        else:
            gx = gh
            gv = gh * beta
        tl.store(gx_ptr + off, gx, mask=mask)
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
        decay, tau, beta, vth, soft = opts["fwd"]
        _lif_fwd[grid](xf, v0f if v0f is not None else xf, spikes, v_last, S, N, tau, beta, vth,
                       HAS_V0=v0f is not None, DECAY=decay, SOFT=soft, BLOCK=BLOCK,
                       enable_fp_fusion=False)  # fmt: skip
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
        decay, tau, beta, vth, soft, detach, sur, alpha = ctx.opts["bwd"]
        _lif_bwd[(B, triton.cdiv(N, BLOCK))](
            xf, v0f if v0f is not None else xf, gs, gvl if gvl is not None else gs, h, gx,
            gv0 if gv0 is not None else gx, S, N, tau, beta, vth, alpha,
            HAS_V0=v0f is not None, HAS_GVL=gvl is not None, DECAY=decay, SOFT=soft, DETACH=detach, SUR=sur,
            BLOCK=BLOCK, enable_fp_fusion=False,
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

    fp32 arithmetic (x may be fp32, bf16 or fp16; the dispatch runs float64 in the reference); spikes in x's
    dtype, the membrane v_last in fp32.
    """
    if reset not in ("hard", "soft"):
        raise ValueError(f"reset must be 'hard' or 'soft', got {reset!r}")
    if surrogate not in SURROGATES:
        raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")
    beta = charge_constants(tau, decay_input)[2]
    charge = (bool(decay_input), float(tau), beta)  # tau as a float32 kernel argument: float32(tau), as PyTorch
    opts = {
        "fwd": (*charge, v_threshold, reset == "soft"),
        "bwd": (*charge, v_threshold, reset == "soft", bool(detach_reset), SURROGATES.index(surrogate), alpha),
    }
    return _LifScanTriton.apply(x, v0, opts)
