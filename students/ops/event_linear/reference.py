"""The dense truth for the event-driven linear layer: y = x W^T + b, one matmul (torch.nn.functional.linear)."""
import torch
import torch.nn.functional as F


def event_linear_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., in], weight [out, in], bias [out] or None -> y [..., out] = x W^T + b (dense matmul)."""
    return F.linear(x, weight, bias)
