"""Text generation through transformers' own `GenerationMixin.generate`, with text streamed as it is produced.

The student plugs into `generate` through its recurrent state (a transformers Cache): the prompt is read once,
then each new token costs one O(1) step; any other HF causal LM uses its KV cache. Used by `spikedistill
generate` (pieces printed as they come), the lm-eval adapter's generate_until (stop strings end it early) and
the leaderboard's sample.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from eval import EvalError


def stop_token_ids(model, tokenizer) -> list[int]:
    """Every token id generation stops at: the model's generation_config.eos_token_id (one id or a list; an
    exported student lists its tokenizer's EOS and the document separator it was trained on, e.g. [2, 0] for
    the bundled teacher's tokenizer), then the tokenizer's EOS if not already there."""
    listed = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids: list[int] = []
    for value in [*(listed if isinstance(listed, (list, tuple)) else [listed]), tokenizer.eos_token_id]:
        if value is not None and int(value) not in ids:
            ids.append(int(value))
    return ids


def until_stop(tokens: Sequence[int], stop_ids: Collection[int]) -> list[int]:
    """The tokens before the first stop id (all of them when none is there)."""
    cut = next((i for i, t in enumerate(tokens) if t in stop_ids), len(tokens))
    return list(tokens[:cut])


class TextPieces(BaseStreamer):
    """A transformers streamer that hands each new piece of decoded text to `on_text` as soon as its token exists.

    The first `put` (the prompt) is skipped; text ends before the first stop id (see stop_token_ids). A piece is
    released only once it decodes cleanly, so a multi-byte character split over two tokens arrives whole; what
    is still held back when generation ends (a character cut off by max_new_tokens) is released by `end`, so
    the pieces add up to the text `generate_text` returns. Batch size 1.
    """

    def __init__(self, tokenizer, on_text: Callable[[str], None], stop_ids: Collection[int] = ()):
        self.tokenizer, self.on_text, self.stop_ids = tokenizer, on_text, set(stop_ids)
        self.tokens: list[int] = []
        self.stopped = False
        self.shown = ""
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        if self.stopped:
            return
        new = value.reshape(-1).tolist()
        kept = until_stop(new, self.stop_ids)
        self.stopped = len(kept) < len(new)
        self.tokens += kept
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if not text.endswith("\ufffd"):
            self._show(text)

    def end(self) -> None:
        self._show(self.tokenizer.decode(self.tokens, skip_special_tokens=True))

    def _show(self, text: str) -> None:
        if len(text) > len(self.shown):
            self.on_text(text[len(self.shown):])
            self.shown = text


class StopWhen(StoppingCriteria):
    """Stops generation once `stop(text generated so far)` is true (the text ends before the first stop id).
    Batch size 1."""

    def __init__(self, tokenizer, prompt_length: int, stop: Callable[[str], bool], stop_ids: Collection[int] = ()):
        self.tokenizer, self.prompt_length, self.stop, self.stop_ids = tokenizer, prompt_length, stop, set(stop_ids)

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        new = until_stop(input_ids[0, self.prompt_length:].tolist(), self.stop_ids)
        done = bool(self.stop(self.tokenizer.decode(new, skip_special_tokens=True)))
        return torch.full((input_ids.shape[0],), done, dtype=torch.bool, device=input_ids.device)


def sampling_kwargs(temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
                    repetition_penalty: float = 1.0) -> dict:
    """`generate` keyword arguments for our CLI's convention: temperature 0 = greedy, top_k 0 / top_p 1 = off.

    repetition_penalty > 1 divides the positive logits (multiplies the negative ones) of every token already in
    the prompt or the continuation, greedy or sampled (CTRL, Keskar et al. 2019, arXiv 1909.05858); 1 = off.
    Raises ValueError for a penalty <= 0."""
    if repetition_penalty <= 0:
        raise ValueError(f"repetition_penalty must be > 0 (1 = off), got {repetition_penalty}")
    penalty = {"repetition_penalty": repetition_penalty if repetition_penalty != 1.0 else None}
    if temperature <= 0:
        return {"do_sample": False, "temperature": None, "top_k": None, "top_p": None, **penalty}
    return {"do_sample": True, "temperature": temperature, "top_k": top_k or None,
            "top_p": top_p if top_p < 1.0 else None, **penalty}


@torch.no_grad()
def generate_text(
    model,
    tokenizer,
    prompt: str | Sequence[int],
    max_new_tokens: int = 50,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    on_text: Callable[[str], None] | None = None,
    stop: Callable[[str], bool] | None = None,
    repetition_penalty: float = 1.0,
) -> str:
    """The continuation of `prompt` (text, or token ids) as text, from `model.generate`.

    Greedy when temperature <= 0, else sampling with top_k (0 = off) and top_p (1 = off); repetition_penalty > 1
    discourages tokens already seen (see sampling_kwargs); `seed` makes a sample reproducible without touching
    the global RNG. Stops at any of `stop_token_ids` (the exported stop set: the tokenizer's EOS and the training
    separator; not included), after max_new_tokens, or once `stop(text so far)` is true. `on_text(piece)`
    receives the text as it is produced; the pieces add up to the returned text. Raises EvalError for an empty
    prompt.
    """
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise EvalError("generate: the prompt is empty after tokenization; pass a non-empty --prompt")
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    stops = stop_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (stops[0] if stops else None)
    kwargs = {"max_new_tokens": max_new_tokens, "attention_mask": torch.ones_like(input_ids),
              "eos_token_id": stops or None, "pad_token_id": pad,
              **sampling_kwargs(temperature, top_k, top_p, repetition_penalty)}
    if on_text is not None:
        kwargs["streamer"] = TextPieces(tokenizer, on_text, stops)
    if stop is not None:
        kwargs["stopping_criteria"] = StoppingCriteriaList([StopWhen(tokenizer, len(ids), stop, stops)])
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(input_ids, **kwargs)
    return tokenizer.decode(until_stop(out[0, len(ids):].tolist(), stops), skip_special_tokens=True)
