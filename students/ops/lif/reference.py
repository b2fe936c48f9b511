"""Multi-step LIF neuron, plain PyTorch: the truth the fused kernels are tested against.

Charge  H_t = beta * V_{t-1} + c * X_t   with beta = 1 - 1/tau, c = 1/tau (decay_input) or 1
Fire    S_t = spike(H_t - v_threshold)
Reset   hard: V_t = H_t * (1 - S_t)      soft (subtractive): V_t = H_t - S_t * v_threshold
With decay_input this is spikingjelly's LIFNode, H_t = V_{t-1} + (X_t - V_{t-1}) / tau (SpikeGPT).
"""
import torch

from ..surrogate import spike


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

    Returns (spikes [B, S, *N] in {0, 1}, in x's dtype; membrane after the last step [B, *N], fp32).
    The membrane is charged in fp32 whatever x's dtype, and handed back in fp32: a bf16 membrane rounded at
    every call would make a sequence fed in pieces (streaming, chunked scoring) fire differently from one pass.
    """
    if reset not in ("hard", "soft"):
        raise ValueError(f"reset must be 'hard' or 'soft', got {reset!r}")
    beta = 1.0 - 1.0 / tau
    gain = 1.0 / tau if decay_input else 1.0
    v = torch.zeros_like(x[:, 0], dtype=torch.float32) if v0 is None else v0.float()
    out = []
    for x_t in x.float().unbind(1):  # unbind, not x[:, t]: indexing makes the backward O(S^2)
        h = beta * v + gain * x_t
        s = spike(h - v_threshold, surrogate, alpha)
        s_reset = s.detach() if detach_reset else s
        v = h * (1.0 - s_reset) if reset == "hard" else h - s_reset * v_threshold
        out.append(s)
    return torch.stack(out, 1).to(x.dtype), v
