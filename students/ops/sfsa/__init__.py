"""Softmax-free spiking attention. Layers call `sfsa` / `sfsa_linear`; they dispatch to a backend."""
from .._dispatch import select_backend
from .reference import causal_mask, sfsa_linear_reference, sfsa_reference


def sfsa(q, k, v, threshold, **kwargs):
    """See `sfsa_reference`: q, k, v [B, H, L, D] -> (A V [B, H, L, D], A [B, H, L, L])."""
    backend = select_backend(q)
    if backend == "cpu":
        from .cpu import sfsa_cpu

        return sfsa_cpu(q, k, v, threshold, **kwargs)
    if backend == "triton":
        from .triton import sfsa_triton

        return sfsa_triton(q, k, v, threshold, **kwargs)
    return sfsa_reference(q, k, v, threshold, **kwargs)


def sfsa_linear(q, k, v, state=None):
    """See `sfsa_linear_reference`: -> (out [B, H, L, D], state [B, H, D, D]).

    The fast path (CPU and CUDA alike) is the chunked form in sfsa/cpu.py: batched matmuls, no custom kernel.
    """
    if select_backend(q) == "reference":
        return sfsa_linear_reference(q, k, v, state)
    from .cpu import sfsa_linear_chunked

    return sfsa_linear_chunked(q, k, v, state)


__all__ = ["causal_mask", "sfsa", "sfsa_linear", "sfsa_linear_reference", "sfsa_reference"]
