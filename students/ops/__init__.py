"""Fused spike ops. Each op folder holds reference.py (the truth), a fast CPU path, a Triton kernel,
and one dispatch function; layers only ever call the dispatch functions exported here."""
from ._dispatch import kernel_backend
from .event_linear import EventWeight, event_linear
from .lif import lif_scan
from .sfsa import sfsa, sfsa_linear
from .surrogate import spike
from .wkv import wkv, wkv_initial_state

__all__ = ["EventWeight", "event_linear", "kernel_backend", "lif_scan", "sfsa", "sfsa_linear", "spike", "wkv", "wkv_initial_state"]
