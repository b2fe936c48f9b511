"""Which implementation of a fused op runs: SPIKEDISTILL_KERNELS=auto|reference|cpu|triton (default auto).

auto picks the Triton kernel for CUDA tensors and the fast CPU path otherwise. A backend that cannot run the
given tensors (the CPU library failed to build, triton missing, triton on CPU without TRITON_INTERPRET=1) falls
back to the reference, with one warning per reason. float64 inputs always run the reference, which computes in
float64 (the fast paths are float32 inside), so a float64 model is never silently lowered to float32.
"""
import importlib.util
import os
import warnings
from functools import cache

import torch

BACKENDS = ("auto", "reference", "cpu", "triton")
FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def kernel_backend(device: torch.device) -> str:
    """The backend name for tensors on `device`: 'reference', 'cpu' or 'triton'."""
    choice = os.environ.get("SPIKEDISTILL_KERNELS", "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(f"SPIKEDISTILL_KERNELS must be one of {BACKENDS}, got {choice!r}")
    if choice == "auto":
        return "triton" if torch.device(device).type == "cuda" else "cpu"
    return choice


@cache
def _warn_once(reason: str) -> None:
    warnings.warn(f"students/ops: {reason}; using the reference implementation.", RuntimeWarning, stacklevel=3)


def _triton_usable(device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install triton)"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return "the Triton kernels need CUDA tensors, or TRITON_INTERPRET=1 on CPU"
    return None


def select_backend(t: torch.Tensor, *others: torch.Tensor | None) -> str:
    """The backend that will actually run for tensor `t` (and `others`, e.g. a carried state; None entries are
    skipped): kernel_backend of t's device, minus what cannot run here."""
    backend = kernel_backend(t.device)
    if backend == "reference":
        return backend
    if any(o is not None and o.dtype not in FAST_DTYPES for o in (t, *others)):
        return "reference"  # fp64 (gradcheck, float64 models) and other dtypes: the reference keeps their precision
    if backend == "cpu":
        if t.device.type != "cpu":
            _warn_once(f"SPIKEDISTILL_KERNELS=cpu but the tensors are on {t.device.type}")
            return "reference"
        from .csrc import library

        return "cpu" if library() is not None else "reference"
    problem = _triton_usable(t.device)
    if problem:
        _warn_once(problem)
        return "reference"
    return "triton"
