"""Fused CPU LIF scan: one C loop over time per block of 64 neurons, fp32 inside (spikingjelly's charge,
students/ops/csrc/lif_charge.h). float64 never comes here: the dispatch sends it to the float64 reference.

The forward stores nothing but its inputs (x, v0); the backward recomputes the membrane per neuron block and
runs the surrogate-gradient recurrence backwards in time.
"""
import torch

from ..csrc import library, ptr, threads
from ..surrogate import SURROGATES
from .reference import charge_constants


class _LifScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, v0, opts):
        lib = library()
        B, S = x.shape[:2]
        xf = x.reshape(B, S, -1).float().contiguous()
        v0f = None if v0 is None else v0.reshape(B, -1).float().contiguous()
        spikes = torch.empty_like(xf)
        v_last = torch.empty(B, xf.shape[2], dtype=torch.float32)
        lib.lif_forward(ptr(xf), ptr(v0f), ptr(spikes), ptr(v_last), B, S, xf.shape[2], *opts["fwd"], threads())
        ctx.save_for_backward(xf, v0f)
        ctx.opts, ctx.x_shape, ctx.x_dtype = opts, x.shape, x.dtype
        ctx.v0_dtype = None if v0 is None else v0.dtype
        return spikes.to(x.dtype).view(x.shape), v_last.view(x.shape[:1] + x.shape[2:])  # membrane stays fp32

    @staticmethod
    def backward(ctx, g_spikes, g_vlast):
        xf, v0f = ctx.saved_tensors
        B, S, N = xf.shape
        gs = torch.zeros_like(xf) if g_spikes is None else g_spikes.reshape(B, S, N).float().contiguous()
        gv = None if g_vlast is None else g_vlast.reshape(B, N).float().contiguous()
        gx = torch.empty_like(xf)
        gv0 = None if v0f is None else torch.empty_like(v0f)
        library().lif_backward(
            ptr(xf), ptr(v0f), ptr(gs), ptr(gv), ptr(gx), ptr(gv0), B, S, N, *ctx.opts["bwd"], threads()
        )
        gx = gx.to(ctx.x_dtype).view(ctx.x_shape)
        if gv0 is not None:
            gv0 = gv0.to(ctx.v0_dtype).view(ctx.x_shape[:1] + ctx.x_shape[2:])
        return gx, gv0, None


def lif_scan_cpu(
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

    Computes in fp32 (x may be fp32, bf16 or fp16; the dispatch runs float64 in the reference); spikes come
    back in x's dtype, the membrane v_last in fp32.
    """
    if reset not in ("hard", "soft"):
        raise ValueError(f"reset must be 'hard' or 'soft', got {reset!r}")
    if surrogate not in SURROGATES:
        raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")
    charge, soft = charge_constants(tau, decay_input), int(reset == "soft")
    opts = {
        "fwd": (*charge, v_threshold, soft),
        "bwd": (*charge, v_threshold, soft, int(detach_reset), SURROGATES.index(surrogate), alpha),
    }
    return _LifScan.apply(x, v0, opts)
