"""LM head + cross-entropy, plain PyTorch: the truth the fused paths are tested against.

loss = CE(x W^T, labels): the logits [N, V] are materialised, in fp32 whatever the input dtype.
"""
import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
REDUCTIONS = ("mean", "sum")


def check_args(x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, reduction: str) -> None:
    """The shape and argument checks every backend shares; raises ValueError naming the argument."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"linear_cross_entropy: x [N, C] and weight [V, C] expected, got {tuple(x.shape)} and {tuple(weight.shape)}"
        )
    if labels.shape != x.shape[:1] or labels.dtype != torch.long:
        raise ValueError(
            f"linear_cross_entropy: labels must be int64 [N] = [{x.shape[0]}], got {labels.dtype} {tuple(labels.shape)}"
        )


def linear_cross_entropy_reference(
    x: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, reduction: str = "mean"
) -> torch.Tensor:
    """x [N, C] head input, weight [V, C] (a bias-free LM head), labels [N] (-100 = ignored) -> scalar fp32.

    reduction "mean": the mean over the labelled rows (NaN if there are none, as F.cross_entropy); "sum": their sum.
    """
    check_args(x, weight, labels, reduction)
    logits = F.linear(x.float(), weight.float())
    return F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction=reduction)
