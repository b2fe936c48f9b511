"""Event-driven CPU linear layer for binary inputs: y = x W^T + b as a gather-add of the rows of W^T.

For x in {0, 1}, row m of the output is the bias plus the sum of the rows i of W^T [in, out] where x[m, i] = 1,
so the weight reads and adds scale with the firing rate (sparse_ops.cpp: event_linear). W^T is built once per
weight and kept in an `EventWeight` owned by the layer. Inference only: no autograd.
"""
import weakref

import torch

from ..csrc import library, threads

# Adds per OpenMP thread below which one thread runs the call (a fork/join costs microseconds).
ADDS_PER_THREAD = 1 << 18


class EventWeight:
    """W^T [in, out] (contiguous, the weight's dtype) for one weight, rebuilt when the weight changes.

    "Changes" means another tensor, another storage or dtype, or an in-place op on the weight (its version
    counter; optimizer steps and load_state_dict bump it). A write through `weight.data` that keeps the
    storage bypasses the version counter and is not seen: call `reset()` after one.
    """

    __slots__ = ("_key", "_ref", "_wt")

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._ref, self._key, self._wt = None, None, None

    def get(self, weight: torch.Tensor) -> torch.Tensor:
        key = (weight.data_ptr(), weight._version, weight.dtype, tuple(weight.shape))
        if self._ref is None or self._ref() is not weight or self._key != key:
            self._wt = weight.detach().t().contiguous()
            self._ref, self._key = weakref.ref(weight), key
        return self._wt

    # Copies and pickles of a layer start with an empty cache (a weakref cannot be pickled).
    def __deepcopy__(self, memo) -> "EventWeight":
        return EventWeight()

    def __getstate__(self) -> tuple:
        return ()

    def __setstate__(self, state) -> None:
        self.reset()


def event_linear_cpu(
    x: torch.Tensor, weight_t: torch.Tensor, bias: torch.Tensor | None = None, max_rate: float = 1.0
) -> torch.Tensor | None:
    """x [..., in] binary (fp32 or bf16), weight_t = W^T [in, out] (fp32 or bf16) -> y [..., out] in x's dtype.

    Sums in fp32 whatever the dtypes. Returns None, having written nothing, when x holds a value other than
    0 or 1 (NaN included), or when more than `max_rate` of x's entries are 1: run the dense matmul then.
    """
    n_in, n_out = weight_t.shape
    x2 = x.reshape(-1, n_in).contiguous()
    rows = x2.shape[0]
    y = torch.empty(rows, n_out, dtype=torch.float32)
    scratch = torch.empty(rows * (n_in + 1), dtype=torch.int32)  # spike positions, then counts, per row
    b = None if bias is None else bias.detach().float().contiguous()
    # Thread count from the dense work bound (rows * in * out * max_rate adds), before counting events.
    nthreads = max(1, min(threads(), int(rows * n_in * n_out * max_rate) // ADDS_PER_THREAD))
    status = library().event_linear(
        x2.data_ptr(), weight_t.data_ptr(), None if b is None else b.data_ptr(), y.data_ptr(), scratch.data_ptr(),
        rows, n_in, n_out, x2.dtype == torch.bfloat16, weight_t.dtype == torch.bfloat16, max_rate, nthreads,
    )  # fmt: skip
    if status != 0:
        return None
    y = y.view(*x.shape[:-1], n_out)
    return y if x.dtype == torch.float32 else y.to(x.dtype)
