"""Which implementation of a fused op runs: SPIKEDISTILL_KERNELS=auto|reference|cpu|triton (default auto).

auto picks the Triton kernel for CUDA tensors and the fast CPU path otherwise.
"""
import os

import torch

BACKENDS = ("auto", "reference", "cpu", "triton")


def kernel_backend(device: torch.device) -> str:
    """The backend name for tensors on `device`: 'reference', 'cpu' or 'triton'."""
    choice = os.environ.get("SPIKEDISTILL_KERNELS", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"SPIKEDISTILL_KERNELS must be one of {BACKENDS}, got {choice!r}")
    if choice == "auto":
        return "triton" if torch.device(device).type == "cuda" else "cpu"
    return choice
