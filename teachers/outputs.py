"""A frozen teacher and what it returns: logits, input embeddings, per-layer hidden states, attention maps.

Per-layer outputs are captured with forward hooks on the decoder layers themselves, so they mean the same for
every architecture ("the output of decoder layer i"), whatever each model does with `output_hidden_states`.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from torch import nn

from teachers.errors import TeacherError

log = logging.getLogger(__name__)


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


def _first_tensor(x):
    return x[0] if isinstance(x, (tuple, list)) else x


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
            logits = self.model.get_output_embeddings()(h)
            if self._softcap:
                logits = torch.tanh(logits / self._softcap) * self._softcap
            return logits

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 logits: bool = True, hidden_states: bool = True,
                 position_ids: torch.Tensor | None = None) -> TeacherOutput:
        """Run the teacher on input_ids [B, L] without a graph.

        attention_mask: [B, L] (1 = real token), or a 4D additive mask [B, 1, L, L] (0 = attend, the dtype's
        minimum = not) with position_ids [B, L] for tree-shaped attention (see `branched`).
        logits=False skips the LM head (o.logits None; use head() on chunks); hidden_states=False skips
        collecting per-layer outputs (o.hidden_states None). Attention maps come only with attn_maps=True.
        """
        span = input_ids.shape[-1] if position_ids is None else int(position_ids.max()) + 1
        if self.max_length is not None and span > self.max_length:
            raise TeacherError(f"{self.spec}: {span} positions exceed the teacher's max_length "
                               f"{self.max_length}; lower data.seq_len")
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

    def branched(self, rows: list[torch.Tensor],
                 branches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """Last hidden states of token rows plus branch tokens, each branch token seeing a prefix of its row.

        rows: B x LongTensor [T_i]; branches: B x (at [n_i], tokens [n_i]): branch token tokens[k] stands at
        position at[k] (0 <= at[k] <= T_i) and sees row[:at[k]] and itself, as if the row were cut there and
        tokens[k] appended. Returns B x [T_i + n_i, H]: the row's own states, then its branch tokens'.
        One padded forward with a 4D attention mask and explicit position ids where the model honours them
        (`tree_mask_ok`), else one forward per row and one batched forward of its cut-and-appended branches.
        """
        if self.tree_mask_ok():
            return self._branched_masked(rows, branches)
        return [self._branched_separately(row, at, tok) for row, (at, tok) in zip(rows, branches)]

    def tree_mask_ok(self) -> bool:
        """Whether this model honours a 4D attention mask with position ids, checked once on a few tokens
        against separate forwards (a model that ignores or rejects them, or a sliding-window model, gets
        False and the separate-forward path)."""
        if self._tree_ok is None:
            self._tree_ok = self._probe_tree_mask()
            if not self._tree_ok:
                log.warning("teacher %s: no tree-shaped attention (4D mask + position ids); branch tokens run "
                            "as separate forwards (slower)", self.spec)
        return self._tree_ok

    def _probe_tree_mask(self) -> bool:
        if getattr(self.config, "sliding_window", None):
            return False  # a 4D mask replaces the model's own sliding-window masks
        row = (torch.arange(6) * 7 + 3).remainder(self.vocab_size)
        at, tok = torch.tensor([2, 4]), (torch.tensor([5, 11]) * 13).remainder(self.vocab_size)
        try:
            ours = self._branched_masked([row], [(at, tok)])[0]
        except (RuntimeError, ValueError, TypeError, IndexError):
            return False
        ref = self._branched_separately(row, at, tok)
        return bool(((ours.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1.0)) < 1e-2)

    def _branched_masked(self, rows, branches) -> list[torch.Tensor]:
        lengths = [len(r) + len(b[0]) for r, b in zip(rows, branches)]
        size = max(lengths)
        ids = torch.zeros(len(rows), size, dtype=torch.long)
        positions = torch.zeros(len(rows), size, dtype=torch.long)
        keep = torch.eye(size, dtype=torch.bool).repeat(len(rows), 1, 1)  # padding attends to itself
        for i, (row, (at, tok)) in enumerate(zip(rows, branches)):
            n = len(row)
            ids[i, :n], ids[i, n:lengths[i]] = row, tok
            positions[i, :n], positions[i, n:lengths[i]] = torch.arange(n), at
            keep[i, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
            keep[i, n:lengths[i], :n] = torch.arange(n)[None, :] < at[:, None]
        mask = torch.zeros(keep.shape, dtype=self.dtype).masked_fill(~keep, torch.finfo(self.dtype).min)
        h = self(ids, attention_mask=mask[:, None], position_ids=positions, logits=False,
                 hidden_states=False).last_hidden_state
        return [h[i, :n] for i, n in enumerate(lengths)]

    def _branched_separately(self, row: torch.Tensor, at: torch.Tensor, tok: torch.Tensor) -> torch.Tensor:
        own = self(row[None], logits=False, hidden_states=False).last_hidden_state[0]
        if at.numel() == 0:
            return own
        cut = [torch.cat([row[:a], tok[k:k + 1]]) for k, a in enumerate(at.tolist())]
        length = torch.tensor([len(c) for c in cut])
        ids = torch.nn.utils.rnn.pad_sequence(cut, batch_first=True)
        mask = (torch.arange(ids.shape[1])[None, :] < length[:, None]).long()
        h = self(ids, attention_mask=mask, logits=False, hidden_states=False).last_hidden_state
        return torch.cat([own, h[torch.arange(len(cut)), length.to(h.device) - 1]])

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
