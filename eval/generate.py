"""Text generation through transformers' own `GenerationMixin.generate`, with text streamed as it is produced.

The student plugs into `generate` through its recurrent state (a transformers Cache): the prompt is read once,
then each new token costs one O(1) step; any other HF causal LM uses its KV cache. Used by `spikedistill
generate` (pieces printed as they come), the lm-eval adapter's generate_until (stop strings end it early) and
the leaderboard's sample.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from eval import EvalError


class TextPieces(BaseStreamer):
    """A transformers streamer that hands each new piece of decoded text to `on_text` as soon as its token exists.

    The first `put` (the prompt) is skipped, EOS tokens are left out, and a piece is released only once it
    decodes cleanly, so a multi-byte character split over two tokens arrives whole. Batch size 1.
    """

    def __init__(self, tokenizer, on_text: Callable[[str], None], eos_token_id: int | None = None):
        self.tokenizer, self.on_text, self.eos = tokenizer, on_text, eos_token_id
        self.tokens: list[int] = []
        self.shown = ""
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        self.tokens += [t for t in value.reshape(-1).tolist() if t != self.eos]
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd") or len(text) <= len(self.shown):
            return
        self.on_text(text[len(self.shown):])
        self.shown = text

    def end(self) -> None:
        pass


class StopWhen(StoppingCriteria):
    """Stops generation once `stop(text generated so far)` is true (EOS tokens left out). Batch size 1."""

    def __init__(self, tokenizer, prompt_length: int, stop: Callable[[str], bool], eos_token_id: int | None):
        self.tokenizer, self.prompt_length, self.stop, self.eos = tokenizer, prompt_length, stop, eos_token_id

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        new = [t for t in input_ids[0, self.prompt_length:].tolist() if t != self.eos]
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
    the global RNG. Stops at the tokenizer's EOS (not included), after
    max_new_tokens, or once `stop(text so far)` is true. `on_text(piece)` receives the text as it is produced.
    Raises EvalError for an empty prompt.
    """
    ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
    if not ids:
        raise EvalError("generate: the prompt is empty after tokenization; pass a non-empty --prompt")
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    eos = tokenizer.eos_token_id
    kwargs = {"max_new_tokens": max_new_tokens, "attention_mask": torch.ones_like(input_ids),
              "eos_token_id": eos, "pad_token_id": tokenizer.pad_token_id if tokenizer.pad_token_id is not None
              else eos, **sampling_kwargs(temperature, top_k, top_p, repetition_penalty)}
    if on_text is not None:
        kwargs["streamer"] = TextPieces(tokenizer, on_text, eos)
    if stop is not None:
        kwargs["stopping_criteria"] = StoppingCriteriaList([StopWhen(tokenizer, len(ids), stop, eos)])
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        out = model.generate(input_ids, **kwargs)
    new = [t for t in out[0, len(ids):].tolist() if t != eos]
    return tokenizer.decode(new, skip_special_tokens=True)
