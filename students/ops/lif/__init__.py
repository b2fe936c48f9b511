"""Multi-step LIF scan. Layers call `lif_scan`; it dispatches to a backend."""
from .._dispatch import kernel_backend
from .reference import lif_scan_reference


def lif_scan(x, v0=None, **kwargs):
    """See `lif_scan_reference` for the contract: x [B, S, *N] -> (spikes [B, S, *N], v_last [B, *N])."""
    kernel_backend(x.device)  # validates SPIKEDISTILL_KERNELS; only the reference exists so far
    return lif_scan_reference(x, v0, **kwargs)


__all__ = ["lif_scan", "lif_scan_reference"]
