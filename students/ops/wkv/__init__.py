"""RWKV-4 WKV recurrence. Layers call `wkv`; it dispatches to a backend."""
from .._dispatch import select_backend
from .reference import wkv_initial_state, wkv_reference


def wkv(time_decay, time_first, k, v, state=None):
    """See `wkv_reference`: k, v [B, L, C] -> (y [B, L, C], (num, den, max_exp) each [B, C])."""
    backend = select_backend(k)
    if backend == "cpu":
        from .cpu import wkv_cpu

        return wkv_cpu(time_decay, time_first, k, v, state)
    if backend == "triton":
        from .triton import wkv_triton

        return wkv_triton(time_decay, time_first, k, v, state)
    return wkv_reference(time_decay, time_first, k, v, state)


__all__ = ["wkv", "wkv_initial_state", "wkv_reference"]
