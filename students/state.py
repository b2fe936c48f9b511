"""The recurrent state of a SpikeGPT student: everything a forward needs to continue where the last one stopped.

It is a transformers `Cache`, so `GenerationMixin.generate` carries it between steps (and returns it with
`return_dict_in_generate=True`), beam search reorders it, and a caller may pass one in to continue a text.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from .config import StudentError


class SpikeGPTState(Cache):
    """Per-module recurrent state, keyed by each stateful module's qualified name.

    Entries (shapes use B = batch, T = time steps, C = width, H heads of D channels):
      LIF membranes [B, N] (the membrane carries along the flattened token-major L*T axis);
      token-shift previous inputs [B*T, C]; WKV (num, den, max_exp) each [B*T, C];
      SFSA binary K/V spike cache, two [B*T, H, L_seen, D]; SFSA-linear state [B*T, H, D, D].
    Every tensor's first axis is the batch, row-major over (B, T) where it holds B*T rows; that is what
    `reorder_cache` and the other batch methods rely on. `seen_tokens` counts tokens consumed so far (not steps).
    Unlike a key/value cache it cannot be cropped: a recurrent state has no per-token entries to drop.
    """

    is_compileable = False

    def __init__(self) -> None:
        super().__init__(layers=[])
        self.tensors: dict[str, object] = {}
        self.seen_tokens = 0
        self.holds_beams = False  # set by reorder_cache: the rows are beam search's running beams
        self.epoch = 0  # counts changes of the entries (not of their values): the fused decode step rebinds then

    def get(self, key: str):
        """The entry of module `key`, or None before its first forward."""
        return self.tensors.get(key)

    def set(self, key: str, value) -> None:
        self.tensors[key] = value
        self.epoch += 1

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Tokens consumed so far (the same for every layer)."""
        return self.seen_tokens

    def get_max_length(self, layer_idx: int | None = None) -> int:
        """-1: no maximum (the config's max_position, if set, is checked by the model)."""
        return -1

    @property
    def is_croppable(self) -> bool:
        return False

    def crop(self, tokens_to_remove: int) -> None:
        raise StudentError("SpikeGPTState cannot be cropped: a recurrent state keeps no per-token entries")

    def reset(self) -> None:
        """Forget everything: the next forward starts from zero state."""
        self.tensors.clear()
        self.epoch += 1
        self.seen_tokens = 0
        self.holds_beams = False

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Beam search: row b of the new state is row beam_idx[b] of the old one. beam_idx [B] (in place).

        Marks the state `holds_beams`: the model's `generate` then refills it from the sequences it returns."""
        self._map_rows(len(beam_idx), lambda rows: rows.index_select(0, beam_idx.to(rows.device)))
        self.holds_beams = True

    def batch_repeat_interleave(self, repeats: int) -> None:
        """Repeat each batch row `repeats` times in place (B -> B * repeats)."""
        self._map_rows(None, lambda rows: rows.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep only the batch rows `indices` (in place)."""
        self._map_rows(None, lambda rows: rows[indices.to(rows.device)])

    def to(self, device: torch.device | str) -> SpikeGPTState:
        """Move every entry to `device` (in place); returns self."""
        self.tensors = {k: _apply(v, lambda t: t.to(device)) for k, v in self.tensors.items()}
        self.epoch += 1
        return self

    @property
    def batch_size(self) -> int:
        """B, read from the LIF membranes ([B, N]); -1 before the first forward."""
        sizes = [t.shape[0] for t in self.tensors.values() if isinstance(t, torch.Tensor)]
        return min(sizes) if sizes else -1

    def _map_rows(self, batch: int | None, fn) -> None:
        """Apply fn to every tensor viewed as [B, rows per batch element, ...] (its first axis split)."""
        batch = self.batch_size if batch is None else batch

        def one(t: torch.Tensor) -> torch.Tensor:
            if t.shape[0] % batch:
                raise StudentError(f"SpikeGPTState: an entry of {t.shape[0]} rows does not split into batch {batch}")
            per = t.shape[0] // batch
            out = fn(t.reshape(batch, per, *t.shape[1:]))
            return out.reshape(out.shape[0] * per, *t.shape[1:])

        if batch > 0:
            self.tensors = {k: _apply(v, one) for k, v in self.tensors.items()}
            self.epoch += 1

    def __repr__(self) -> str:
        return f"SpikeGPTState(seen_tokens={self.seen_tokens}, entries={len(self.tensors)})"


def _apply(value, fn):
    """fn on a tensor, or on each tensor of a (nested) tuple."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    return type(value)(_apply(v, fn) for v in value)
