"""A frozen teacher and what it returns: logits, input embeddings, per-layer hidden states, attention maps.

Per-layer outputs are captured with forward hooks on the decoder layers themselves, so they mean the same for
every architecture ("the output of decoder layer i"), whatever each model does with `output_hidden_states`.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers.utils import ModelOutput

from teachers.errors import TeacherError

log = logging.getLogger(__name__)
# the forward argument and output field of a KV cache: transformers 5.24 renamed `past_key_values` to `cache`
# (the old name only a deprecated property of ModelOutput from then on)
CACHE_FIELD = "cache" if isinstance(getattr(ModelOutput, "past_key_values", None), property) else "past_key_values"


@dataclass
class TeacherOutput:
    """logits [B, L, V] or None; embeddings [B, L, H] (the input of decoder layer 0: token embeddings with
    any scaling and learned positions the model adds); hidden_states: num_layers x [B, L, H] (output of
    each decoder layer, before the final norm) or None; attentions: num_layers x [B, heads, L, L] or None;
    last_hidden_state [B, L, H]: what the LM head reads (after the final norm)."""

    logits: torch.Tensor | None
    embeddings: torch.Tensor
    hidden_states: tuple[torch.Tensor, ...] | None
    attentions: tuple[torch.Tensor, ...] | None
    last_hidden_state: torch.Tensor


@dataclass
class Prefill:
    """Token rows after `Teacher.prefill`: rows B x LongTensor [T_i]; states B x [T_i, H], their last hidden
    states; cache: the model's KV cache of the rows right-padded to `length` = max T_i (None where branch tokens
    run as separate forwards)."""

    rows: list[torch.Tensor]
    states: list[torch.Tensor]
    cache: Any
    length: int


def _right_padded(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """B x [T_i] -> ids [B, T] (padded with 0), attention mask [B, T] (1 = real token)."""
    ids = torch.nn.utils.rnn.pad_sequence(list(rows), batch_first=True)
    lengths = torch.tensor([len(r) for r in rows])
    return ids, (torch.arange(ids.shape[1])[None, :] < lengths[:, None]).long()


def _first_tensor(x):
    return x[0] if isinstance(x, (tuple, list)) else x


def soft_cap(logits: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Final logit soft-capping, cap * tanh(logits / cap) (Gemma 2's final_logit_softcapping); the logits
    unchanged when cap is None or 0."""
    return torch.tanh(logits / cap) * cap if cap else logits


class Teacher:
    """A frozen causal LM (eval mode, requires_grad False) plus its tokenizer; call it on token ids."""

    def __init__(self, model: nn.Module, tokenizer, fingerprint: str, spec: str, attn_maps: bool = False,
                 tokenizer_hash: str = ""):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.fingerprint = fingerprint
        self.tokenizer_hash = tokenizer_hash
        self.spec = spec
        self.attn_maps = attn_maps
        self.layers = _decoder_layers(model)
        self._softcap = getattr(self.config, "final_logit_softcapping", None)
        self._tree_ok: bool | None = None

    @property
    def config(self):
        return self.model.config

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    @property
    def num_heads(self) -> int:
        return int(self.config.num_attention_heads)

    @property
    def vocab_size(self) -> int:
        """Width of the logits (the LM head's output rows; may exceed len(tokenizer) when padded)."""
        return int(self.model.get_output_embeddings().weight.shape[0])

    @property
    def max_length(self) -> int | None:
        for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(self.config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None

    def head(self, h: torch.Tensor) -> torch.Tensor:
        """LM head (plus any final logit soft-capping): h [..., H] -> logits [..., V], no graph."""
        with torch.no_grad():
            return soft_cap(self.model.get_output_embeddings()(h), self._softcap)

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 logits: bool = True, hidden_states: bool = True,
                 position_ids: torch.Tensor | None = None) -> TeacherOutput:
        """Run the teacher on input_ids [B, L] without a graph.

        attention_mask: [B, L] (1 = real token), or a 4D additive mask [B, 1, L, L] (0 = attend, the dtype's
        minimum = not) with position_ids [B, L] for tree-shaped attention (see `branched`).
        logits=False skips the LM head (o.logits None; use head() on chunks); hidden_states=False skips
        collecting per-layer outputs (o.hidden_states None). Attention maps come only with attn_maps=True.
        """
        self._check_span(input_ids.shape[-1] if position_ids is None else int(position_ids.max()) + 1)
        captured: list[torch.Tensor] = []
        embeds: list[torch.Tensor] = []
        ids = input_ids.to(self.device)
        mask = attention_mask.to(self.device) if attention_mask is not None else None
        extra = {} if position_ids is None else {"position_ids": position_ids.to(self.device)}
        with torch.no_grad(), self._hooks(captured, embeds, hidden_states):
            out = self.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False,
                                        output_attentions=self.attn_maps, return_dict=True, **extra)
        last = getattr(out, "last_hidden_state", None)
        if last is None:
            raise TeacherError(f"{self.spec}: the backbone of {type(self.model).__name__} returns no "
                               "last_hidden_state; this architecture is not supported as a teacher")
        attentions = tuple(out.attentions) if self.attn_maps and out.attentions is not None else None
        return TeacherOutput(
            logits=self.head(last) if logits else None,
            embeddings=embeds[0],
            hidden_states=tuple(captured) if hidden_states else None,
            attentions=attentions,
            last_hidden_state=last,
        )

    @contextlib.contextmanager
    def _hooks(self, captured: list, embeds: list, hidden_states: bool):
        def grab_input(_module, args, kwargs):
            embeds.append(_first_tensor(args) if args else kwargs["hidden_states"])

        def grab_output(_module, _args, output):
            captured.append(_first_tensor(output))

        handles = [self.layers[0].register_forward_pre_hook(grab_input, with_kwargs=True)]
        if hidden_states:
            handles += [layer.register_forward_hook(grab_output) for layer in self.layers]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def prefill(self, rows: list[torch.Tensor]) -> Prefill:
        """Last hidden states of token rows, keeping what a later `branch_step` needs.

        rows: B x LongTensor [T_i]. One forward of the rows right-padded to T = max T_i; where the model honours
        a 4D mask with position ids over its KV cache (`tree_mask_ok`), with use_cache, so that branch tokens
        later cost one decode step and the rows are never recomputed. Returns a Prefill (states B x [T_i, H]).
        """
        cached = self.tree_mask_ok()
        return self._prefill(rows, cached)

    def branch_step(self, prefill: Prefill, branches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """Last hidden states of branch tokens, each seeing a prefix of its prefilled row.

        branches: B x (at [n_i], tokens [n_i]): branch token tokens[k] stands at position at[k] (0 <= at[k] <=
        T_i) and sees row[:at[k]] and itself, as if the row were cut there and tokens[k] appended. Returns B x
        [n_i, H]. With the prefill's KV cache: one step of all B rows' branch tokens (position ids at, a 4D mask
        letting branch k attend to cached keys < at[k] and to itself); without it, one batched forward of the
        cut-and-appended rows. A cached Prefill takes one step (the step grows its cache): TeacherError after.
        """
        if sum(int(at.numel()) for at, _ in branches) == 0:
            return [prefill.states[0].new_zeros(0, prefill.states[0].shape[-1]) for _ in branches]
        if prefill.cache is None:
            return self._branches_separately(prefill.rows, branches)
        return self._branches_cached(prefill, branches)

    def branched(self, rows: list[torch.Tensor],
                 branches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """`prefill` then `branch_step`: B x [T_i + n_i, H], the row's own states, then its branch tokens'."""
        prefill = self.prefill(rows)
        steps = self.branch_step(prefill, branches)
        return [torch.cat([own, extra]) for own, extra in zip(prefill.states, steps)]

    def tree_mask_ok(self) -> bool:
        """Whether this model honours a 4D attention mask with position ids over its KV cache, checked once on a
        few tokens against separate forwards (a model that ignores or rejects them, or a sliding-window model,
        gets False: branch tokens then run as separate forwards)."""
        if self._tree_ok is None:
            self._tree_ok = self._probe_tree_mask()
            if not self._tree_ok:
                log.warning("teacher %s: no branch step over the KV cache (4D mask + position ids); branch tokens "
                            "run as separate forwards (slower)", self.spec)
        return self._tree_ok

    def _probe_tree_mask(self) -> bool:
        if getattr(self.config, "sliding_window", None):
            return False  # a 4D mask replaces the model's own sliding-window masks
        rows = [(torch.arange(6) * 7 + 3).remainder(self.vocab_size), torch.arange(3).remainder(self.vocab_size)]
        branches = [(torch.tensor([2, 4, 6]), (torch.tensor([5, 11, 2]) * 13).remainder(self.vocab_size)),
                    (torch.tensor([1]), torch.tensor([4]).remainder(self.vocab_size))]
        try:
            ours = self._branches_cached(self._prefill(rows, cached=True), branches)
        except (RuntimeError, ValueError, TypeError, IndexError, AttributeError, TeacherError):
            return False
        ref = self._branches_separately(rows, branches)
        return all(bool(((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1.0)) < 1e-2)
                   for a, b in zip(ours, ref))

    def _base(self, ids: torch.Tensor, mask: torch.Tensor, **kwargs):
        """The decoder (no head) on ids [B, L] with an attention mask [B, L] or [B, 1, L, K], no graph."""
        with torch.no_grad():
            return self.model.base_model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                         return_dict=True, **kwargs)

    def _prefill(self, rows: list[torch.Tensor], cached: bool) -> Prefill:
        ids, mask = _right_padded(rows)
        self._check_span(ids.shape[1])
        out = self._base(ids, mask, use_cache=cached)
        states = [out.last_hidden_state[i, : len(r)] for i, r in enumerate(rows)]
        cache = getattr(out, CACHE_FIELD) if cached else None
        return Prefill(rows=list(rows), states=states, cache=cache, length=ids.shape[1])

    def _branches_cached(self, prefill: Prefill, branches) -> list[torch.Tensor]:
        if prefill.cache.get_seq_length() != prefill.length:
            raise TeacherError("this Prefill's KV cache already took a branch step; prefill the rows again")
        counts = [int(at.numel()) for at, _ in branches]
        size, past = max(counts), prefill.length
        ids = torch.zeros(len(branches), size, dtype=torch.long)
        positions = torch.zeros(len(branches), size, dtype=torch.long)
        keep = torch.zeros(len(branches), size, past + size, dtype=torch.bool)
        keep[:, :, past:] = torch.eye(size, dtype=torch.bool)  # each branch token (and padding) sees itself
        for i, (at, tok) in enumerate(branches):
            ids[i, : counts[i]], positions[i, : counts[i]] = tok, at
            keep[i, : counts[i], :past] = torch.arange(past)[None, :] < at[:, None]
        mask = torch.zeros(keep.shape, dtype=self.dtype).masked_fill(~keep, torch.finfo(self.dtype).min)
        self._check_span(int(positions.max()) + 1)
        h = self._base(ids, mask[:, None], position_ids=positions.to(self.device), use_cache=True,
                       **{CACHE_FIELD: prefill.cache}).last_hidden_state
        return [h[i, :n] for i, n in enumerate(counts)]

    def _branches_separately(self, rows: list[torch.Tensor], branches) -> list[torch.Tensor]:
        cut = [torch.cat([row[:a], tok[k:k + 1]]) for row, (at, tok) in zip(rows, branches)
               for k, a in enumerate(at.tolist())]
        ids, mask = _right_padded(cut)
        self._check_span(ids.shape[1])
        h = self._base(ids, mask, use_cache=False).last_hidden_state
        last = h[torch.arange(len(cut)), mask.sum(1).to(h.device) - 1]
        return list(last.split([int(at.numel()) for at, _ in branches]))

    def _check_span(self, span: int) -> None:
        if self.max_length is not None and span > self.max_length:
            raise TeacherError(f"{self.spec}: {span} positions exceed the teacher's max_length "
                               f"{self.max_length}; lower data.seq_len")

    def check_head(self) -> None:
        """Check head(last_hidden_state) reproduces the model's own logits on a few tokens, so chunked
        teacher logits are exact; raise TeacherError for an LM head spikedistill does not know."""
        ids = torch.arange(8, device=self.device).remainder(self.vocab_size).unsqueeze(0)
        with torch.no_grad():
            reference = self.model(input_ids=ids, use_cache=False).logits.float()
        ours = self(ids, hidden_states=False).logits.float()
        scale = reference.abs().max().clamp_min(1.0)
        if ours.shape != reference.shape or ((ours - reference).abs().max() / scale) > 1e-2:
            raise TeacherError(f"{self.spec}: its LM head does more than a linear map + soft-capping "
                               f"({type(self.model).__name__}); this architecture is not supported as a teacher")

    def __repr__(self) -> str:
        return (f"Teacher({self.spec!r}, layers={self.num_layers}, hidden={self.hidden_size}, "
                f"vocab={self.vocab_size}, dtype={self.dtype}, attn_maps={self.attn_maps})")


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder layers: the shallowest ModuleList with num_hidden_layers entries."""
    n = getattr(model.config, "num_hidden_layers", None)
    candidates = [(name.count("."), name, module) for name, module in model.base_model.named_modules()
                  if isinstance(module, nn.ModuleList) and len(module) == n]
    if not candidates:
        raise TeacherError(f"{type(model).__name__}: cannot find its {n} decoder layers; "
                           "this architecture is not supported as a teacher")
    return min(candidates, key=lambda c: c[0])[2]
