"""RWKV-4 WKV recurrence, plain PyTorch, in the numerically stable running-max form.

y_t = (sum_{i<t} e^{-(t-1-i) e^w + k_i} v_i + e^{u + k_t} v_t) / (sum_{i<t} e^{-(t-1-i) e^w + k_i} + e^{u + k_t})
State (num, den, max_exp), each [B, C] fp32: num and den are scaled by e^{-max_exp}, so nothing overflows.
"""
import torch

NEG_INF = -1e38  # the empty state's max exponent; finite so that p + w stays finite
# exp(time_decay) is taken at most at this exponent: exp(88) = 1.65e38 is the last power of e below fp32's
# largest float. Beyond it exp() overflows, w = -inf, and the backward multiplies a zero decay factor by
# dw/d(time_decay) = -inf (NaN). The clamp changes no value: a decay of e^-(e^88) per step is exactly 0 in fp32
# and float64 alike, and so is the true gradient through it.
MAX_DECAY_EXP = 88.0


def decay_rate(time_decay: torch.Tensor) -> torch.Tensor:
    """w = -exp(time_decay) [C] in fp32, finite for any time_decay (see MAX_DECAY_EXP)."""
    return -torch.exp(time_decay.float().clamp(max=MAX_DECAY_EXP))


def wkv_initial_state(batch: int, channels: int, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The empty WKV state: (num, den, max_exp), each [B, C] fp32."""
    zeros = torch.zeros(batch, channels, device=device, dtype=torch.float32)
    return zeros, zeros.clone(), torch.full_like(zeros, NEG_INF)


def wkv_reference(
    time_decay: torch.Tensor,
    time_first: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    state: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """time_decay w, time_first u: [C]; k, v: [B, L, C]. The decay per step is exp(-exp(w)).

    Returns (y [B, L, C] in k's dtype, new state). Accumulates in fp32.
    """
    dtype = k.dtype
    w = decay_rate(time_decay)
    u = time_first.float()
    num, den, p = wkv_initial_state(k.shape[0], k.shape[2], k.device) if state is None else state
    ys = []
    for k_t, v_t in zip(k.float().unbind(1), v.float().unbind(1)):
        uk = u + k_t
        q = torch.maximum(p, uk)
        e1, e2 = torch.exp(p - q), torch.exp(uk - q)
        ys.append((e1 * num + e2 * v_t) / (e1 * den + e2))
        pw = p + w
        q = torch.maximum(pw, k_t)
        e1, e2 = torch.exp(pw - q), torch.exp(k_t - q)
        num, den, p = e1 * num + e2 * v_t, e1 * den + e2, q
    return torch.stack(ys, 1).to(dtype), (num, den, p)
