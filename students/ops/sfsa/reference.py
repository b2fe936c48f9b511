"""Softmax-free spiking attention (BiSpikCLM SFSA), plain PyTorch.

sfsa:        S = (Q K^T) ⊙ M (M the binary causal mask), A = spike(S - theta) ⊙ M, out = A V
sfsa_linear: out = ((Q K^T) ⊙ M) V, i.e. linear attention with recurrent state sum_j k_j^T v_j
No softmax and no 1/sqrt(d): the threshold theta is the scale. Q, K, V are {0,1} spike tensors.
"""
import torch

from ..surrogate import spike


def causal_mask(length: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Binary lower-triangular mask M [L, L] (1 where key j <= query i)."""
    return torch.ones(length, length, device=device, dtype=dtype).tril()


def sfsa_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    threshold: torch.Tensor | float,
    *,
    surrogate: str = "atan",
    alpha: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v: [B, H, L, D]; threshold: scalar or [H] (per head), > 0.

    Returns (out [B, H, L, D] = A V, integer-valued; A [B, H, L, L] binary attention map).
    """
    mask = causal_mask(q.shape[2], q.device, q.dtype)
    scores = (q @ k.transpose(-1, -2)) * mask
    theta = torch.as_tensor(threshold, dtype=q.dtype, device=q.device)
    if theta.dim() == 1:
        theta = theta.view(1, -1, 1, 1)
    attn = spike(scores - theta, surrogate, alpha) * mask
    return attn @ v, attn


def sfsa_linear_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v: [B, H, L, D]; state: [B, H, D, D] = sum over earlier tokens of k_j^T v_j (zeros if None).

    Returns (out [B, H, L, D], state after the last token [B, H, D, D]).
    """
    mask = causal_mask(q.shape[2], q.device, q.dtype)
    out = ((q @ k.transpose(-1, -2)) * mask) @ v
    if state is not None:
        out = out + q @ state.to(q.dtype)
        new_state = state + k.transpose(-1, -2) @ v
    else:
        new_state = k.transpose(-1, -2) @ v
    return out, new_state
