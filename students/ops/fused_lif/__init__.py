"""LIF neurons fused with the elementwise producer of their input. Layers call the three dispatch functions.

On CPU the fused C kernels run (cpu.py); on CUDA the producer runs in PyTorch and the LIF through the Triton
LIF kernel (no fused Triton kernel yet); SPIKEDISTILL_KERNELS=reference and float64 (any input or the membrane)
run the reference, in float64.
"""
from .._dispatch import select_backend
from ..lif import lif_scan
from .reference import relu_square_lif_reference, sigmoid_gate_lif_reference, token_shift_lif_reference


def sigmoid_gate_lif(r, y, v0=None, lif=None):
    """See `sigmoid_gate_lif_reference`: r, y [B, S, N] -> (LIF(sigmoid(r) * y) [B, S, N], v_last [B, N] or None)."""
    backend = select_backend(r, y, v0)
    if backend == "cpu":
        from .cpu import sigmoid_gate_lif_cpu

        return sigmoid_gate_lif_cpu(r, y, v0, lif)
    return sigmoid_gate_lif_reference(r, y, v0, lif, **_scan(backend))


def relu_square_lif(z, v0=None, lif=None):
    """See `relu_square_lif_reference`: z [B, S, N] -> (LIF(relu(z)^2) [B, S, N], v_last [B, N] or None)."""
    backend = select_backend(z, v0)
    if backend == "cpu":
        from .cpu import relu_square_lif_cpu

        return relu_square_lif_cpu(z, v0, lif)
    return relu_square_lif_reference(z, v0, lif, **_scan(backend))


def token_shift_lif(h, mix, prev=None, v0=None, steps=1, lif=None):
    """See `token_shift_lif_reference`: h [B, L*T, C], mix [K, C] -> (out [B, L*T, K*C], v_last, last [B*T, C])."""
    backend = select_backend(h, mix, prev, v0)
    if backend == "cpu":
        from .cpu import token_shift_lif_cpu

        return token_shift_lif_cpu(h, mix, prev, v0, steps, lif)
    return token_shift_lif_reference(h, mix, prev, v0, steps, lif, **_scan(backend))


def _scan(backend: str) -> dict:
    """The LIF scan the composed paths use: the dispatched one (Triton on CUDA), or the reference."""
    return {"scan": lif_scan} if backend == "triton" else {}


__all__ = [
    "relu_square_lif",
    "relu_square_lif_reference",
    "sigmoid_gate_lif",
    "sigmoid_gate_lif_reference",
    "token_shift_lif",
    "token_shift_lif_reference",
]
