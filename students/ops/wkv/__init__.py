"""RWKV-4 WKV recurrence. Layers call `wkv`; it dispatches to a backend."""
from .._dispatch import kernel_backend
from .reference import wkv_initial_state, wkv_reference


def wkv(time_decay, time_first, k, v, state=None):
    """See `wkv_reference`: k, v [B, L, C] -> (y [B, L, C], (num, den, max_exp) each [B, C])."""
    kernel_backend(k.device)
    return wkv_reference(time_decay, time_first, k, v, state)


__all__ = ["wkv", "wkv_reference", "wkv_initial_state"]
