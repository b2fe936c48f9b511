"""LM head + cross-entropy in one op. Callers use `linear_cross_entropy`; it dispatches to a backend."""
import torch

from .._dispatch import select_backend
from .reference import IGNORE_INDEX, linear_cross_entropy_reference


def linear_cross_entropy(
    x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, reduction: str = "mean", chunk_size: int = 256
) -> torch.Tensor:
    """CE of the logits x W^T without holding [N, V]: x [N, C], weight [V, C], labels [N] (-100 ignored) -> scalar.

    Same value and gradients as `linear_cross_entropy_reference` (fp32 maths). The fast paths work through
    chunk_size rows at a time and, when gradients are needed, compute them during the forward (three head
    matmuls instead of four); on CPU a binary x ({0, 1} spikes) reads only the weight columns of its active
    inputs (see cpu.py). Raises ValueError on mismatched shapes or an unknown reduction.
    """
    backend = select_backend(x)
    if backend == "cpu":
        from .cpu import linear_cross_entropy_cpu

        return linear_cross_entropy_cpu(x, weight, labels, reduction, chunk_size)
    if backend == "triton":
        from .triton import linear_cross_entropy_triton

        return linear_cross_entropy_triton(x, weight, labels, reduction, chunk_size)
    return linear_cross_entropy_reference(x, weight, labels, reduction)


__all__ = ["IGNORE_INDEX", "linear_cross_entropy", "linear_cross_entropy_reference"]
