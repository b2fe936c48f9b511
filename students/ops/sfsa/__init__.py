"""Softmax-free spiking attention. Layers call `sfsa` / `sfsa_linear`; they dispatch to a backend."""
from .._dispatch import kernel_backend
from .reference import causal_mask, sfsa_linear_reference, sfsa_reference


def sfsa(q, k, v, threshold, **kwargs):
    """See `sfsa_reference`: q, k, v [B, H, L, D] -> (A V [B, H, L, D], A [B, H, L, L])."""
    kernel_backend(q.device)
    return sfsa_reference(q, k, v, threshold, **kwargs)


def sfsa_linear(q, k, v, state=None):
    """See `sfsa_linear_reference`: -> (out [B, H, L, D], state [B, H, D, D])."""
    kernel_backend(q.device)
    return sfsa_linear_reference(q, k, v, state)


__all__ = ["sfsa", "sfsa_linear", "sfsa_reference", "sfsa_linear_reference", "causal_mask"]
