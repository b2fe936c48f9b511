"""The recurrent state of a SpikeGPT student: everything a forward needs to continue where the last one stopped."""
from __future__ import annotations

import torch


class SpikeGPTState:
    """Per-module recurrent state, keyed by each stateful module's qualified name.

    Entries (shapes use B = batch, T = time steps, C = width, H heads of D channels):
      LIF membranes [B, N] (the membrane carries along the flattened token-major L*T axis);
      token-shift previous inputs [B*T, C]; WKV (num, den, max_exp) each [B*T, C];
      SFSA binary K/V spike cache, two [B*T, H, L_seen, D]; SFSA-linear state [B*T, H, D, D].
    `seen_tokens` counts tokens consumed so far (not steps).
    """

    def __init__(self) -> None:
        self.tensors: dict[str, object] = {}
        self.seen_tokens = 0

    def get(self, key: str):
        """The entry of module `key`, or None before its first forward."""
        return self.tensors.get(key)

    def set(self, key: str, value) -> None:
        self.tensors[key] = value

    def get_seq_length(self) -> int:
        """Tokens consumed so far (HF Cache naming)."""
        return self.seen_tokens

    def to(self, device: torch.device | str) -> SpikeGPTState:
        """Move every entry to `device` (in place); returns self."""
        self.tensors = {k: _move(v, device) for k, v in self.tensors.items()}
        return self

    def __repr__(self) -> str:
        return f"SpikeGPTState(seen_tokens={self.seen_tokens}, entries={len(self.tensors)})"


def _move(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    return type(value)(_move(v, device) for v in value)
