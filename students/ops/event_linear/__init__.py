"""Event-driven linear layer for binary spike inputs. Layers call `event_linear`; it picks the path.

SPIKEDISTILL_SPARSE=auto|on|off (default auto): `auto` takes the gather-add (cpu.py) where it measured faster
than the dense matmul on this CPU (a large enough weight, few enough rows, a firing rate below the crossover
calibrate.py measured for that row count: `event_plan`); `on` takes it whenever it can run (tests, benchmarks);
`off` always runs the dense matmul (reference.py). The event path can run when the input is on CPU, fp32 or bf16
like the weight, no gradient is needed, the fused kernels are enabled (SPIKEDISTILL_KERNELS is not `reference`)
and the input is binary (checked by the kernel, which falls back to dense otherwise).
"""
import os

import torch

from .._dispatch import select_backend
from ..csrc import library
from .calibrate import crossover
from .cpu import EventWeight
from .reference import event_linear_reference

MODES = ("auto", "on", "off")
EVENT_DTYPES = (torch.float32, torch.bfloat16)
MIN_WEIGHTS = 1 << 17  # in * out below this: the event call costs more than it saves, the dense matmul runs


def sparse_mode() -> str:
    """SPIKEDISTILL_SPARSE, validated: 'auto', 'on' or 'off'."""
    mode = os.environ.get("SPIKEDISTILL_SPARSE", "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise ValueError(f"SPIKEDISTILL_SPARSE must be one of {MODES}, got {mode!r}")
    return mode


def event_plan(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> float | None:
    """The firing rate up to which the event path runs for this call (None: dense matmul, rate not counted).

    In `auto` mode the first call that needs it measures this CPU's crossover (calibrate.py, under a second,
    cached on disk)."""
    mode = sparse_mode()
    if mode == "off":
        return None
    if mode == "auto" and weight.dim() == 2 and weight.shape[0] * weight.shape[1] < MIN_WEIGHTS:
        return None  # cheapest test first: this runs for every binary Linear
    if x.dtype not in EVENT_DTYPES or weight.dtype != x.dtype or not (x.is_cpu and weight.is_cpu):
        return None
    if weight.dim() != 2 or x.dim() == 0 or x.shape[-1] != weight.shape[1]:
        return None  # the dense matmul raises its own shape error
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad or (bias is not None and bias.requires_grad)):
        return None
    choice = os.environ.get("SPIKEDISTILL_KERNELS", "auto").strip().lower()
    if choice in ("auto", "cpu", ""):  # CPU fp32/bf16 tensors: what select_backend decides, without its overhead
        usable = library() is not None
    else:
        usable = select_backend(x) == "cpu"
    if not usable:
        return None
    return crossover(x.numel() // weight.shape[1], weight.numel()) if mode == "auto" else 1.0


def event_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, cache: EventWeight | None = None
) -> torch.Tensor:
    """y = x W^T + b: x [..., in], weight [out, in], bias [out] or None -> y [..., out], x's dtype.

    For binary x the event path sums the rows of W^T picked by the spikes (equal to the dense matmul up to the
    order of float additions); otherwise, or when it would be slower, the dense matmul runs. `cache` keeps W^T
    between calls (a layer owns one); without it W^T is rebuilt every call.
    """
    max_rate = event_plan(x, weight, bias)
    if max_rate is not None:
        from .cpu import event_linear_cpu

        weight_t = (cache or EventWeight()).get(weight)
        y = event_linear_cpu(x, weight_t, bias, max_rate)
        if y is not None:
            return y
    return event_linear_reference(x, weight, bias)


__all__ = ["EventWeight", "event_linear", "event_linear_reference", "event_plan", "sparse_mode"]
