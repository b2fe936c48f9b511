"""LIF neurons fed by their producer, plain PyTorch: the truth the fused kernels are tested against.

Each op computes an input current X from its producer's outputs, then the LIF scan of `students.ops.lif`
(`lif` = its keyword arguments; None = no neuron, the op returns X itself):
  sigmoid_gate_lif  X = sigmoid(r) * y                      (SpikeGPT's receptance gates: WKV and the FFN)
  relu_square_lif   X = relu(z)^2                           (the SRFFN hidden layer)
  token_shift_lif   X_k = h_prev + mix_k * (h - h_prev)     (RWKV token shift, one branch per row of mix)
Shapes follow the steps layout [B, S, C] with S = L*T (L tokens of T steps, token-major): the token shift
pairs step s with step s - T, i.e. each token with the previous token at the same step.
"""
from __future__ import annotations

import torch

from ..lif import lif_scan_reference


def _neuron(x, v0, lif, scan):
    if lif is None:
        return x, None
    return scan(x, v0, **lif)


def sigmoid_gate_lif_reference(r, y, v0=None, lif=None, scan=lif_scan_reference):
    """r, y [B, S, N], v0 [B, N] or None -> (out [B, S, N], v_last [B, N] or None): LIF(sigmoid(r) * y)."""
    return _neuron(torch.sigmoid(r) * y, v0, lif, scan)


def relu_square_lif_reference(z, v0=None, lif=None, scan=lif_scan_reference):
    """z [B, S, N], v0 [B, N] or None -> (out [B, S, N], v_last [B, N] or None): LIF(relu(z)^2)."""
    return _neuron(torch.relu(z).square(), v0, lif, scan)


def token_shift_lif_reference(h, mix, prev=None, v0=None, steps=1, lif=None, scan=lif_scan_reference):
    """Token shift of h, branch by branch, then LIF.

    h [B, L*T, C] (steps layout); mix [K, C]; prev [B*T, C]: the input of the token before h (None: zeros).
    Returns (out [B, L*T, K*C] with branch k in channels k*C..(k+1)*C, v_last [B, K*C] or None,
    last [B*T, C]: h's last token, the `prev` of a continuation).
    """
    b, s, c = h.shape
    x = h.view(b, s // steps, steps, c).transpose(1, 2).reshape(b * steps, s // steps, c)  # [B*T, L, C]
    first = torch.zeros_like(x[:, :1]) if prev is None else prev.unsqueeze(1).to(x.dtype)
    x_prev = torch.cat([first, x[:, :-1]], 1)
    diff = x - x_prev
    mixed = torch.cat([x_prev + mu * diff for mu in mix], -1)
    k = mixed.shape[-1]
    mixed = mixed.view(b, steps, s // steps, k).transpose(1, 2).reshape(b, s, k)  # back to [B, L*T, K*C]
    out, v_last = _neuron(mixed, v0, lif, scan)
    return out, v_last, x[:, -1]
