"""Fast SFSA paths.

sfsa: blocks of query rows; each block multiplies only the keys up to its diagonal (the causal mask makes the
rest zero), so the BLAS products do about half the work at long L. The threshold + mask (forward) and the
surrogate gradient + mask + threshold gradient (backward) are each one fused C pass over the block. The
forward keeps q, k, v and the binary map it returns; the backward recomputes the scores block by block.

sfsa_linear: a chunked form (plain torch, differentiable by autograd): within a chunk of c tokens the masked
product, across chunks a running [D, D] state, so the cost is O(L c D + L D^2) instead of O(L^2 D).
"""
import torch

from ..csrc import library, ptr, threads
from ..surrogate import SURROGATES

ROW_BLOCK = 64


def _theta_rows(theta: torch.Tensor, B: int, H: int) -> torch.Tensor:
    """Threshold per (batch, head) [B * H] fp32 from a scalar or [H] threshold."""
    t = theta.detach().float()
    return (t.view(1, -1) if t.dim() == 1 else t.view(1, 1)).expand(B, H).contiguous().view(-1)


def _row_blocks(L: int):
    return [(r0, min(r0 + ROW_BLOCK, L)) for r0 in range(0, L, ROW_BLOCK)]


def _flat(t: torch.Tensor) -> torch.Tensor:
    """[B, H, L, D] -> contiguous fp32 [B*H, L, D]."""
    return t.float().reshape(-1, *t.shape[2:]).contiguous()


class _Sfsa(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, theta, surrogate, alpha):
        B, H, L, _ = q.shape
        qf, kf, vf = _flat(q), _flat(k), _flat(v)
        th = _theta_rows(theta, B, H)
        attn = torch.zeros(B * H, L, L)
        out = torch.empty(B * H, L, v.shape[-1])
        lib = library()
        for r0, r1 in _row_blocks(L):
            blk = torch.bmm(qf[:, r0:r1], kf[:, :r1].transpose(1, 2))  # [BH, R, r1]: keys up to the diagonal
            lib.sfsa_threshold(ptr(blk), ptr(th), B * H, r1 - r0, r1, r0, threads())
            torch.bmm(blk, vf[:, :r1], out=out[:, r0:r1])
            attn[:, r0:r1, :r1] = blk
        attn = attn.view(B, H, L, L)
        ctx.save_for_backward(q, k, v, theta, attn)
        ctx.opts = (SURROGATES.index(surrogate), alpha)
        return out.view(B, H, L, -1).to(q.dtype), attn.to(q.dtype)

    @staticmethod
    def backward(ctx, g_out, g_attn):
        q, k, v, theta, attn = ctx.saved_tensors
        B, H, L, _ = q.shape
        qf, kf, vf = _flat(q), _flat(k), _flat(v)
        go = torch.zeros(B * H, L, v.shape[-1]) if g_out is None else _flat(g_out)
        ga = None if g_attn is None else g_attn.float().reshape(B * H, L, L)
        a = attn.view(B * H, L, L)
        th = _theta_rows(theta, B, H)
        g_q, g_k, g_v = torch.empty_like(qf), torch.zeros_like(kf), torch.zeros_like(vf)
        g_theta_rows = torch.empty(B * H, L)
        lib = library()
        for r0, r1 in _row_blocks(L):
            g_s = torch.bmm(go[:, r0:r1], vf[:, :r1].transpose(1, 2))  # d attn, [BH, R, r1]
            if ga is not None:
                g_s += ga[:, r0:r1, :r1]
            scores = torch.bmm(qf[:, r0:r1], kf[:, :r1].transpose(1, 2))
            rows_theta = g_theta_rows[:, r0:r1].contiguous()
            lib.sfsa_threshold_backward(
                ptr(g_s), ptr(scores), ptr(th), ptr(rows_theta), B * H, r1 - r0, r1, r0, *ctx.opts, threads()
            )
            g_theta_rows[:, r0:r1] = rows_theta
            torch.bmm(g_s, kf[:, :r1], out=g_q[:, r0:r1])
            g_k[:, :r1] += torch.bmm(g_s.transpose(1, 2), qf[:, r0:r1])
            g_v[:, :r1] += torch.bmm(a[:, r0:r1, :r1].transpose(1, 2), go[:, r0:r1])
        g_theta = g_theta_rows.view(B, H, L).sum(-1)
        g_theta = (g_theta.sum(0) if theta.dim() == 1 else g_theta.sum()).to(theta.dtype).view_as(theta)
        shape = q.shape
        return (g_q.view(shape).to(q.dtype), g_k.view(shape).to(k.dtype), g_v.view(v.shape).to(v.dtype),
                g_theta, None, None)  # fmt: skip


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
