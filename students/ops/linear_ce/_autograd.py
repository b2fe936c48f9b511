"""Attach gradients computed during the forward to a scalar loss (shared by the fast paths)."""
from collections.abc import Callable

import torch

from .reference import check_args


class _Precomputed(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, loss, g_x, g_w):
        ctx.save_for_backward(g_x, g_w)
        return loss.clone()

    @staticmethod
    def backward(ctx, g):
        g_x, g_w = ctx.saved_tensors
        # the loss is linear in its incoming gradient: scale the stored d loss / d input (skip the pass at 1)
        if g_x is not None and not bool(g == 1):
            g_x = g_x * g.to(g_x.dtype)
        if g_w is not None and not bool(g == 1):
            g_w = g_w * g.to(g_w.dtype)
        return g_x, g_w, None, None, None


def with_grads(loss, x, weight, g_x, g_w):
    """loss (a detached scalar) that backpropagates g_x into x and g_w into weight, each times d out / d loss."""
    return _Precomputed.apply(x, weight, loss, g_x, g_w)


def wanted(x: torch.Tensor, weight: torch.Tensor) -> tuple[bool, bool]:
    """Whether the gradients of x and of weight are needed by the surrounding autograd graph."""
    enabled = torch.is_grad_enabled()
    return enabled and x.requires_grad, enabled and weight.requires_grad


def fused_loss(fused: Callable, x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, reduction: str,
               chunk_size: int) -> torch.Tensor:
    """A fast path's `linear_cross_entropy`: checks the arguments, runs `fused(x, weight, labels, reduction,
    chunk_size, want_x, want_w) -> (loss, g_x or None, g_w or None)` without autograd, and attaches the
    gradients it computed. Raises ValueError for bad arguments or chunk_size < 1."""
    check_args(x, weight, labels, reduction)
    if chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be >= 1, got {chunk_size}")
    want_x, want_w = wanted(x, weight)
    with torch.no_grad():
        loss, g_x, g_w = fused(x.detach(), weight.detach(), labels, reduction, chunk_size, want_x, want_w)
    if not (want_x or want_w):
        return loss
    g_x = None if g_x is None else g_x.to(x.dtype)
    g_w = None if g_w is None else g_w.to(weight.dtype)
    return with_grads(loss, x, weight, g_x, g_w)
