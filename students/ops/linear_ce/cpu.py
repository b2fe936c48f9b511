"""Fused CPU LM head + cross-entropy: chunks of rows, gradients in the forward, spike-aware head matmuls.

Per chunk of rows: the logits z = x W^T go into one reused [chunk, V] buffer, a C row kernel turns them into
the loss and, in place, into d loss / d z = scale (softmax(z) - onehot); then d x = dz W and dW += dz^T x.
Three head matmuls per step instead of four, no [N, V] tensor, no autograd graph over the logits.

When x is binary ({0, 1} spikes, as the head input of a spike-driven student) and its firing rate is at most
SPARSE_MAX_RATE, the two matmuls that read x skip the zeros: the logits add up the weight columns of each row's
active inputs, and dW gathers for each input the dz rows where it fired, both over a weight layout packed in
tiles of 32 vocabulary columns ([V/32, C, 32]) so the rows summed stay in cache. The sums equal the dense
matmuls up to float summation order. SPIKEDISTILL_SPARSE=off forces the dense matmuls, =on the spike-aware
ones for any binary input.
"""
import os

import torch

from ..csrc import library, threads
from ._autograd import fused_loss
from .reference import IGNORE_INDEX

# Above this firing rate the dense BLAS matmuls win (bench/train_step.py --sweep-rate measures the crossing).
SPARSE_MAX_RATE = 0.3


def linear_cross_entropy_cpu(
    x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, reduction: str = "mean", chunk_size: int = 256
) -> torch.Tensor:
    """Same contract as `linear_cross_entropy_reference`; x [N, C], weight [V, C], labels [N] -> scalar fp32."""
    return fused_loss(_fused, x, weight, labels, reduction, chunk_size)


def uses_sparse(x: torch.Tensor) -> bool:
    """Whether the spike-aware matmuls run for head input x: x binary and SPIKEDISTILL_SPARSE=auto (default) with
    a firing rate <= SPARSE_MAX_RATE, or =on (any rate); =off never."""
    mode = os.environ.get("SPIKEDISTILL_SPARSE", "auto").strip().lower() or "auto"
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"SPIKEDISTILL_SPARSE must be auto, on or off, got {mode!r}")
    x = x.detach()
    if mode == "off" or x.numel() == 0 or bool(((x != 0) & (x != 1)).any()):
        return False
    return mode == "on" or float(x.float().mean()) <= SPARSE_MAX_RATE


def _fused(x, weight, labels, reduction, chunk, want_x, want_w):
    lib = library()
    n_all, width = x.shape
    vocab = weight.shape[0]
    x32, w32, labels = x.float().contiguous(), weight.float().contiguous(), labels.contiguous()
    count = int((labels != IGNORE_INDEX).sum())
    scale = 1.0 if reduction == "sum" else (1.0 / count if count else 0.0)
    want = want_x or want_w
    sparse = uses_sparse(x32)
    if sparse:
        tile = lib.spike_tile()
        tiles = -(-vocab // tile)
        ld = tiles * tile
        packed = torch.empty(tiles, width, tile)
        lib.pack_tiles(w32.data_ptr(), vocab, width, packed.data_ptr(), tiles, threads())
        g_packed = torch.empty(tiles, width, tile) if want_w else None
    else:
        ld = vocab
        g_w = torch.zeros(vocab, width) if want_w else None
    g_x = torch.empty(n_all, width) if want_x else None
    loss_rows = torch.empty(n_all)
    z = torch.empty(min(chunk, n_all), ld)
    for start in range(0, n_all, chunk):
        rows = slice(start, min(start + chunk, n_all))
        n, x_c, z_c = rows.stop - start, x32[rows], z[: rows.stop - start]
        if sparse:
            ptr, idx = _csr(x_c)
            lib.spike_logits(packed.data_ptr(), width, ptr.data_ptr(), idx.data_ptr(), z_c.data_ptr(), ld, n, tiles,
                             threads())  # fmt: skip
        else:
            torch.mm(x_c, w32.t(), out=z_c)
        lib.ce_rows(z_c.data_ptr(), ld, labels[rows].data_ptr(), n, vocab, scale, int(want),
                    loss_rows[rows].data_ptr(), threads())  # fmt: skip
        if want_x:
            torch.mm(z_c[:, :vocab], w32, out=g_x[rows])
        if want_w and sparse:
            ptr, idx = _csr(x_c.t())
            lib.spike_weight_grad(z_c.data_ptr(), ld, n, ptr.data_ptr(), idx.data_ptr(), g_packed.data_ptr(), width,
                                  tiles, int(start > 0), threads())  # fmt: skip
        elif want_w:
            g_w.addmm_(z_c.t(), x_c)
    loss = loss_rows.sum()
    if reduction == "mean":
        loss = loss / count if count else torch.tensor(float("nan"))
    if want_w and sparse:
        g_w = torch.empty(vocab, width)
        lib.unpack_tiles(g_packed.data_ptr(), vocab, width, g_w.data_ptr(), tiles, threads())
    return loss, g_x, (g_w if want_w else None)


def _csr(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary m [R, K] -> (row pointers int32 [R + 1], column ids int32 [nnz]): the active columns of each row."""
    nz = m.nonzero()
    ptr = torch.zeros(m.shape[0] + 1, dtype=torch.int32)
    ptr[1:] = torch.bincount(nz[:, 0], minlength=m.shape[0]).cumsum(0)
    return ptr, nz[:, 1].to(torch.int32).contiguous()
