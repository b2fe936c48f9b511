"""Triton LM head + cross-entropy: chunks of rows, cuBLAS matmuls, one Triton kernel per chunk for the rows.

Per chunk the logits z = x W^T (cuBLAS, fp32) go into a reused [chunk, V] buffer; `_ce_rows` (one program per
row, two passes over the row: running max and sum, then the gradient) writes the row's loss and overwrites z
with d loss / d z = scale (softmax(z) - onehot); then d x = dz W and dW += dz^T x. Gradients are computed in the
forward as on CPU (cpu.py). On GPUs the matmuls are dense: tensor cores gain nothing from skipping zeros at
these shapes. Tested with TRITON_INTERPRET=1.
"""
import torch
import triton
import triton.language as tl

from ._autograd import fused_loss
from .reference import IGNORE_INDEX

BLOCK = 1024


@triton.jit
def _ce_rows(z_ptr, labels_ptr, loss_ptr, V, ld, scale, WANT_GRAD: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    z_row = z_ptr + row.to(tl.int64) * ld
    label = tl.load(labels_ptr + row)
    valid = label != -100
    m = tl.full([BLOCK], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, V, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        z = tl.load(z_row + cols, mask=cols < V, other=float("-inf"))
        m_new = tl.maximum(m, z)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # lanes still at -inf: keep s = 0, no -inf - -inf
        s = s * tl.exp(m - m_safe) + tl.exp(z - m_safe)
        m = m_new
    m_row = tl.max(m, 0)
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), 0))
    target = tl.load(z_row + tl.where(valid, label, 0))
    tl.store(loss_ptr + row, tl.where(valid, lse - target, 0.0))
    if WANT_GRAD:
        for start in range(0, V, BLOCK):
            cols = start + tl.arange(0, BLOCK)
            z = tl.load(z_row + cols, mask=cols < V, other=0.0)
            g = tl.exp(z - lse) * scale - tl.where(cols == label, scale, 0.0)
            tl.store(z_row + cols, tl.where(valid, g, 0.0), mask=cols < V)


def linear_cross_entropy_triton(
    x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, reduction: str = "mean", chunk_size: int = 256
) -> torch.Tensor:
    """Same contract as `linear_cross_entropy_reference`; x [N, C], weight [V, C], labels [N] -> scalar fp32."""
    return fused_loss(_fused, x, weight, labels, reduction, chunk_size)


def _fused(x, weight, labels, reduction, chunk, want_x, want_w):
    n_all, width = x.shape
    vocab, device = weight.shape[0], x.device
    x32, w32, labels = x.float().contiguous(), weight.float().contiguous(), labels.contiguous()
    count = (labels != IGNORE_INDEX).sum()
    scale = 1.0 if reduction == "sum" else 1.0 / max(int(count), 1)
    want = want_x or want_w
    g_x = torch.empty(n_all, width, device=device) if want_x else None
    g_w = torch.zeros(vocab, width, device=device) if want_w else None
    loss_rows = torch.empty(n_all, device=device)
    z = torch.empty(min(chunk, n_all), vocab, device=device)
    for start in range(0, n_all, chunk):
        rows = slice(start, min(start + chunk, n_all))
        n, x_c = rows.stop - start, x32[rows]
        z_c = z[:n]
        torch.mm(x_c, w32.t(), out=z_c)
        _ce_rows[(n,)](z_c, labels[rows], loss_rows[rows], vocab, vocab, scale, WANT_GRAD=want, BLOCK=BLOCK)
        if want_x:
            torch.mm(z_c, w32, out=g_x[rows])
        if want_w:
            g_w.addmm_(z_c.t(), x_c)
    loss = loss_rows.sum()
    if reduction == "mean":
        loss = loss / count  # NaN when no row is labelled, as F.cross_entropy
    return loss, g_x, g_w
