"""Fast SFSA paths.

sfsa: the two products run as BLAS batched matmuls in fp32; the threshold + causal mask (forward) and the
surrogate gradient + mask + threshold gradient (backward) are each one fused C pass over the [L, L] map. The
forward keeps only q, k, v and the binary map it returns; the backward recomputes the scores.

sfsa_linear: a chunked form (plain torch, differentiable by autograd): within a chunk of c tokens the masked
product, across chunks a running [D, D] state, so the cost is O(L c D + L D^2) instead of O(L^2 D).
"""
import torch

from ..csrc import library, ptr, threads
from ..surrogate import SURROGATES


def _theta_rows(theta: torch.Tensor, B: int, H: int) -> torch.Tensor:
    """Threshold per (batch, head) [B * H] fp32 from a scalar or [H] threshold."""
    t = theta.detach().float()
    return (t.view(1, -1) if t.dim() == 1 else t.view(1, 1)).expand(B, H).contiguous().view(-1)


class _Sfsa(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, theta, surrogate, alpha):
        B, H, L, _ = q.shape
        qf, kf, vf = q.float(), k.float(), v.float()
        th = _theta_rows(theta, B, H)
        attn = torch.matmul(qf, kf.transpose(-1, -2)).contiguous()
        library().sfsa_threshold(ptr(attn), ptr(th), B * H, L, threads())
        out = torch.matmul(attn, vf)
        ctx.save_for_backward(q, k, v, theta, attn)
        ctx.opts = (SURROGATES.index(surrogate), alpha)
        return out.to(q.dtype), attn.to(q.dtype)

    @staticmethod
    def backward(ctx, g_out, g_attn):
        q, k, v, theta, attn = ctx.saved_tensors
        B, H, L, _ = q.shape
        qf, kf, vf = q.float(), k.float(), v.float()
        g_out = torch.zeros(B, H, L, v.shape[-1]) if g_out is None else g_out.float()
        g_s = torch.matmul(g_out, vf.transpose(-1, -2))
        if g_attn is not None:
            g_s += g_attn.float()
        g_s = g_s.contiguous()
        scores = torch.matmul(qf, kf.transpose(-1, -2)).contiguous()
        g_theta_rows, th = torch.empty(B, H, L), _theta_rows(theta, B, H)  # named: the C call needs them alive
        library().sfsa_threshold_backward(
            ptr(g_s), ptr(scores), ptr(th), ptr(g_theta_rows), B * H, L, *ctx.opts, threads()
        )
        g_q = torch.matmul(g_s, kf).to(q.dtype)
        g_k = torch.matmul(g_s.transpose(-1, -2), qf).to(k.dtype)
        g_v = torch.matmul(attn.transpose(-1, -2), g_out).to(v.dtype)
        g_theta = g_theta_rows.sum(-1)
        g_theta = (g_theta.sum(0) if theta.dim() == 1 else g_theta.sum()).to(theta.dtype)
        return g_q, g_k, g_v, g_theta.view_as(theta), None, None


def sfsa_cpu(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    threshold: torch.Tensor | float,
    *,
    surrogate: str = "atan",
    alpha: float = 2.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `sfsa_reference`: q, k, v [B, H, L, D]; threshold scalar or [H] (> 0).

    Returns (out [B, H, L, D], attn [B, H, L, L]) in q's dtype; gradients reach q, k, v and a tensor threshold.
    """
    if surrogate not in SURROGATES:
        raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")
    # the reference compares in q's dtype, so the threshold is rounded to it first
    theta = torch.as_tensor(threshold, dtype=q.dtype, device=q.device)
    return _Sfsa.apply(q, k, v, theta, surrogate, alpha)


def sfsa_linear_chunked(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: torch.Tensor | None = None, chunk: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `sfsa_linear_reference`: q, k, v [B, H, L, D]; state [B, H, D, D] or None.

    Returns (out [B, H, L, D], state after the last token [B, H, D, D]).
    """
    B, H, L, _D = q.shape
    n = -(-L // chunk)
    pad = n * chunk - L
    qc, kc, vc = (torch.nn.functional.pad(t, (0, 0, 0, pad)).view(B, H, n, chunk, -1) for t in (q, k, v))
    mask = torch.ones(chunk, chunk, dtype=q.dtype, device=q.device).tril()
    out = ((qc @ kc.transpose(-1, -2)) * mask) @ vc
    kv = kc.transpose(-1, -2) @ vc  # [B, H, n, D, D] per chunk
    before = kv.cumsum(2) - kv  # state entering each chunk, excluding the chunk itself
    if state is not None:
        before = before + state.to(q.dtype).unsqueeze(2)
    out = (out + qc @ before).view(B, H, n * chunk, -1)[:, :, :L]
    total = kv.sum(2)
    return out, (total if state is None else state + total)
