"""Multi-step LIF scan. Layers call `lif_scan`; it dispatches to a backend."""
from .._dispatch import select_backend
from .reference import lif_scan_reference


def lif_scan(x, v0=None, **kwargs):
    """See `lif_scan_reference` for the contract: x [B, S, *N] -> (spikes [B, S, *N], v_last [B, *N])."""
    backend = select_backend(x, v0)  # float64 x or v0: the float64 reference
    if backend == "cpu":
        from .cpu import lif_scan_cpu

        return lif_scan_cpu(x, v0, **kwargs)
    if backend == "triton":
        from .triton import lif_scan_triton

        return lif_scan_triton(x, v0, **kwargs)
    return lif_scan_reference(x, v0, **kwargs)


__all__ = ["lif_scan", "lif_scan_reference"]
