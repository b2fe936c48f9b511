"""Fused CPU LIF with its producer: one C pass per direction (students/ops/csrc/fused_ops.cpp).

The forward computes the current X on the fly and stores nothing but the producer's outputs; the backward
recomputes X and the membrane per block of 64 neurons, runs the surrogate-gradient recurrence backwards in
time and applies the producer's chain rule in the same pass. fp32 inside (fp32, bf16 or fp16 inputs; the dispatch
runs float64 in the reference); out comes back in the input dtype, v_last in fp32 (the carried membrane is not
rounded). The charge is spikingjelly's (students/ops/csrc/lif_charge.h).
"""
from __future__ import annotations

import torch

from ..csrc import library, ptr, threads
from ..lif.reference import charge_constants
from ..surrogate import SURROGATES

_GATE, _RELU_SQUARE = 0, 1


def _opts(lif: dict | None) -> dict:
    """LIF keyword arguments -> the C kernels' (*charge_constants, vth, soft), (detach, surrogate, alpha), fire."""
    if lif is None:
        return {"fwd": (0, 1.0, 0.0, 0.0, 0), "bwd": (0, 0, 0.0), "fire": 0}
    tau, reset = lif.get("tau", 2.0), lif.get("reset", "hard")
    surrogate = lif.get("surrogate", "atan")
    if reset not in ("hard", "soft"):
        raise ValueError(f"reset must be 'hard' or 'soft', got {reset!r}")
    if surrogate not in SURROGATES:
        raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")
    charge = charge_constants(tau, lif.get("decay_input", True))
    return {
        "fwd": (*charge, lif.get("v_threshold", 1.0), int(reset == "soft")),
        "bwd": (int(lif.get("detach_reset", False)), SURROGATES.index(surrogate), lif.get("alpha", 2.0)),
        "fire": 1,
    }


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float().contiguous()


class _Pointwise(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, v0, kind, opts):
        B, S, N = x.shape
        xf, yf, v0f = _f32(x), _f32(y), _f32(v0)
        out = torch.empty_like(xf)
        v_last = torch.empty(B, N) if opts["fire"] else torch.empty(0)
        library().pointwise_lif_forward(kind, ptr(xf), ptr(yf), ptr(v0f), ptr(out),
                                              ptr(v_last) if opts["fire"] else None, B, S, N, *opts["fwd"],
                                              opts["fire"], threads())  # fmt: skip
        ctx.save_for_backward(xf, yf, v0f)
        ctx.kind, ctx.opts, ctx.dtypes = kind, opts, (x.dtype, None if y is None else y.dtype)
        ctx.v0_dtype = None if v0 is None else v0.dtype
        return out.to(x.dtype), v_last

    @staticmethod
    def backward(ctx, g_out, g_vlast):
        xf, yf, v0f = ctx.saved_tensors
        B, S, N = xf.shape
        go = torch.zeros_like(xf) if g_out is None else g_out.float().contiguous()
        gvl = None if g_vlast is None or not ctx.opts["fire"] else g_vlast.float().contiguous()
        g_x = torch.empty_like(xf)
        g_y = None if yf is None else torch.empty_like(yf)
        g_v0 = None if v0f is None else torch.empty_like(v0f)
        library().pointwise_lif_backward(ctx.kind, ptr(xf), ptr(yf), ptr(v0f), ptr(go), ptr(gvl), ptr(g_x),
                                               ptr(g_y), ptr(g_v0), B, S, N, *ctx.opts["fwd"], *ctx.opts["bwd"],
                                               ctx.opts["fire"], threads())  # fmt: skip
        g_x = g_x.to(ctx.dtypes[0])
        g_y = None if g_y is None else g_y.to(ctx.dtypes[1])
        g_v0 = None if g_v0 is None else g_v0.to(ctx.v0_dtype)
        return g_x, g_y, g_v0, None, None


class _Shift(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, mix, prev, v0, steps, opts):
        B, S, C = h.shape
        K = mix.shape[0]
        hf, mixf, prevf, v0f = _f32(h), _f32(mix), _f32(prev), _f32(v0)
        out = torch.empty(B, S, K * C)
        v_last = torch.empty(B, K * C) if opts["fire"] else torch.empty(0)
        library().shift_lif_forward(ptr(hf), ptr(mixf), ptr(prevf), ptr(v0f), ptr(out),
                                          ptr(v_last) if opts["fire"] else None, B, S, C, K, steps, *opts["fwd"],
                                          opts["fire"], threads())  # fmt: skip
        ctx.save_for_backward(hf, mixf, prevf, v0f)
        ctx.steps, ctx.opts = steps, opts
        ctx.dtypes = (h.dtype, mix.dtype, None if prev is None else prev.dtype, None if v0 is None else v0.dtype)
        last = h[:, S - steps :].reshape(B * steps, C).clone()
        return out.to(h.dtype), v_last, last

    @staticmethod
    def backward(ctx, g_out, g_vlast, g_last):
        hf, mixf, prevf, v0f = ctx.saved_tensors
        B, S, C = hf.shape
        K, T = mixf.shape[0], ctx.steps
        g_h = torch.zeros_like(hf)
        if g_last is not None:
            g_h[:, S - T :] = g_last.float().view(B, T, C)
        go = torch.zeros(B, S, K * C) if g_out is None else g_out.float().contiguous()
        gvl = None if g_vlast is None or not ctx.opts["fire"] else g_vlast.float().contiguous()
        g_mix_rows = torch.empty(B, K, C)
        g_prev = None if prevf is None else torch.empty_like(prevf)
        g_v0 = None if v0f is None else torch.empty_like(v0f)
        library().shift_lif_backward(ptr(hf), ptr(mixf), ptr(prevf), ptr(v0f), ptr(go), ptr(gvl), ptr(g_h),
                                           ptr(g_mix_rows), ptr(g_prev), ptr(g_v0), B, S, C, K, T, *ctx.opts["fwd"],
                                           *ctx.opts["bwd"], ctx.opts["fire"], threads())  # fmt: skip
        h_dt, mix_dt, prev_dt, v0_dt = ctx.dtypes
        return (g_h.to(h_dt), g_mix_rows.sum(0).to(mix_dt), None if g_prev is None else g_prev.to(prev_dt),
                None if g_v0 is None else g_v0.to(v0_dt), None, None)  # fmt: skip


def _v_last(v_last: torch.Tensor, lif: dict | None) -> torch.Tensor | None:
    return v_last if lif is not None else None


def sigmoid_gate_lif_cpu(r, y, v0=None, lif=None):
    """Same contract as `sigmoid_gate_lif_reference`."""
    out, v_last = _Pointwise.apply(r, y, v0, _GATE, _opts(lif))
    return out, _v_last(v_last, lif)


def relu_square_lif_cpu(z, v0=None, lif=None):
    """Same contract as `relu_square_lif_reference`."""
    out, v_last = _Pointwise.apply(z, None, v0, _RELU_SQUARE, _opts(lif))
    return out, _v_last(v_last, lif)


def token_shift_lif_cpu(h, mix, prev=None, v0=None, steps=1, lif=None):
    """Same contract as `token_shift_lif_reference`."""
    out, v_last, last = _Shift.apply(h, mix, prev, v0, steps, _opts(lif))
    return out, _v_last(v_last, lif), last
