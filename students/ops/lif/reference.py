"""Multi-step LIF neuron, plain PyTorch: the truth the fused kernels are tested against.

spikingjelly's LIFNode (torch backend, v_reset = 0 or soft reset), with its order of float operations:
Charge  decay_input:     H_t = V_{t-1} + (X_t - V_{t-1}) / tau      (SpikeGPT)
        not decay_input: H_t = V_{t-1} * (1 - 1/tau) + X_t
Fire    S_t = spike(H_t - v_threshold)
Reset   hard: V_t = H_t * (1 - S_t)      soft (subtractive): V_t = H_t - S_t * v_threshold
Mathematically the charge is beta * V + c * X (beta = 1 - 1/tau, c = 1/tau or 1), but rounded that way it
differs from spikingjelly in the last place, which flips a spike when H lands on the threshold.
"""
import math

import torch

from ..surrogate import spike


def state_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """The dtype a membrane is charged and carried in: float64 if any given tensor is float64, else float32
    (bf16/fp16 inputs are raised to float32; float64 is never lowered)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def charge(v: torch.Tensor, x: torch.Tensor, tau: float, decay_input: bool) -> torch.Tensor:
    """H = V + (X - V) / tau (decay_input) or V * (1 - 1/tau) + X, each operation rounded as spikingjelly's."""
    return v + (x - v) / tau if decay_input else v * (1.0 - 1.0 / tau) + x


def charge_constants(tau: float, decay_input: bool) -> tuple[int, float, float]:
    """The scalars with which the C kernels reproduce `charge` on float32 tensors bit for bit (csrc/lif_charge.h):
    (ChargeKind: 0 decay_input with float32(tau) a power of two, 1 other decay_input, 2 no decay_input;
    1 / float32(tau); float32(1 - 1/tau)). PyTorch rounds a Python scalar to float32 before it divides or
    multiplies a float32 tensor by it."""
    tau32 = float(torch.tensor(tau, dtype=torch.float32))
    kind = (0 if math.frexp(tau32)[0] == 0.5 else 1) if decay_input else 2
    return kind, 1.0 / tau32, float(torch.tensor(1.0 - 1.0 / tau, dtype=torch.float32))


def lif_scan_reference(
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
    """x: [B, S, *N] input current over S time steps; v0: [B, *N] membrane before step 0 (zeros if None).

    Returns (spikes [B, S, *N] in {0, 1}, in x's dtype; membrane after the last step [B, *N], `state_dtype`).
    The membrane is charged in float32 for bf16/fp16/fp32 inputs and handed back in float32: a bf16 membrane
    rounded at every call would make a sequence fed in pieces (streaming, chunked scoring) fire differently
    from one pass. float64 inputs (x or v0) are charged and returned in float64.
    """
    if reset not in ("hard", "soft"):
        raise ValueError(f"reset must be 'hard' or 'soft', got {reset!r}")
    dtype = state_dtype(x, v0)
    v = torch.zeros_like(x[:, 0], dtype=dtype) if v0 is None else v0.to(dtype)
    out = []
    for x_t in x.to(dtype).unbind(1):  # unbind, not x[:, t]: indexing makes the backward O(S^2)
        h = charge(v, x_t, tau, decay_input)
        s = spike(h - v_threshold, surrogate, alpha)
        s_reset = s.detach() if detach_reset else s
        v = h * (1.0 - s_reset) if reset == "hard" else h - s_reset * v_threshold
        out.append(s)
    return torch.stack(out, 1).to(x.dtype), v
