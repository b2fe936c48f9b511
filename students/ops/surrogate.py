"""Heaviside spike with a surrogate gradient: exact {0,1} forward, smooth backward."""
import math

import torch

SURROGATES = ("atan", "sigmoid")


def surrogate_grad(x: torch.Tensor, surrogate: str, alpha: float) -> torch.Tensor:
    """d spike / d x under the named surrogate, evaluated at x (same shape)."""
    if surrogate == "atan":
        return alpha / (2.0 * (1.0 + (math.pi / 2.0 * alpha * x) ** 2))
    if surrogate == "sigmoid":
        sg = torch.sigmoid(alpha * x)
        return alpha * sg * (1.0 - sg)
    raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")


class _Heaviside(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, surrogate, alpha):
        ctx.save_for_backward(x)
        ctx.surrogate, ctx.alpha = surrogate, alpha
        return (x >= 0).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (x,) = ctx.saved_tensors
        return grad_out * surrogate_grad(x, ctx.surrogate, ctx.alpha), None, None


def spike(x: torch.Tensor, surrogate: str = "atan", alpha: float = 2.0) -> torch.Tensor:
    """Heaviside step H(x) (1 where x >= 0) with the surrogate gradient in the backward pass."""
    if surrogate not in SURROGATES:
        raise ValueError(f"surrogate must be one of {SURROGATES}, got {surrogate!r}")
    return _Heaviside.apply(x, surrogate, alpha)
