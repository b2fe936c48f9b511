"""Fused spike ops. Each op folder holds reference.py (the truth), a fast CPU path, a Triton kernel,
and one dispatch function; layers only ever call the dispatch functions exported here."""
from ._dispatch import kernel_backend
from .decode_step import fused_decoder
from .event_linear import EventWeight, event_linear
from .fused_lif import relu_square_lif, sigmoid_gate_lif, token_shift_lif
from .lif import lif_scan
from .linear_ce import linear_cross_entropy
from .sfsa import sfsa, sfsa_linear
from .surrogate import spike
from .wkv import wkv, wkv_initial_state

__all__ = [
    "EventWeight",
    "event_linear",
    "fused_decoder",
    "kernel_backend",
    "lif_scan",
    "linear_cross_entropy",
    "relu_square_lif",
    "sfsa",
    "sfsa_linear",
    "sigmoid_gate_lif",
    "spike",
    "token_shift_lif",
    "wkv",
    "wkv_initial_state",
]
