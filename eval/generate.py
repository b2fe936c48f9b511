"""Token-by-token generation through the model's cache, with streaming text output.

The loop feeds the prompt once, then one token per step with the recurrent state: O(1) work per new token for
the recurrent student, KV-cached decoding for any HF causal LM. Used by `spikedistill generate` and by the
lm-eval adapter's generate_until (stop strings need a loop we control).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from eval import EvalError
from students.outputs import cache_kwargs, state_of


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Pick the next token from logits [B, V] -> ids [B]; temperature 0 means greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # drop a token when the mass before it already reaches top_p (the top token always survives)
        drop_sorted = (cum - sorted_logits.softmax(-1)) >= top_p
        logits = logits.masked_fill(drop_sorted.scatter(-1, order, drop_sorted), float("-inf"))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


@torch.no_grad()
def generate_tokens(
    model,
    input_ids: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_token_id: int | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time for a prompt input_ids [1, T] (stops at EOS, which is yielded)."""
    if input_ids.shape[1] == 0:
        raise EvalError("generate: the prompt is empty after tokenization; pass a non-empty --prompt")
    generator = None
    if seed is not None:
        generator = torch.Generator(device=input_ids.device).manual_seed(seed)
    out = model(input_ids, use_cache=True)
    for _ in range(max_new_tokens):
        token = sample_next(out.logits[:, -1], temperature, top_k, top_p, generator)
        yield int(token[0])
        if eos_token_id is not None and int(token[0]) == eos_token_id:
            return
        out = model(token[:, None], use_cache=True, **cache_kwargs(state_of(out)))


def stream_text(
    model,
    tokenizer,
    prompt: str,
    max_new_tokens: int = 50,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop: Callable[[str], bool] | None = None,
) -> Iterator[str]:
    """Yield decoded text pieces as tokens are produced; `stop(text so far)` ends generation early.

    Pieces are released only when they decode cleanly, so a multi-byte character split over two tokens
    is printed once it is complete.
    """
    device = next(model.parameters()).device
    ids = torch.tensor([tokenizer.encode(prompt)], dtype=torch.long, device=device)
    new, shown = [], ""
    for token in generate_tokens(
        model, ids, max_new_tokens, temperature, top_k, top_p, seed, tokenizer.eos_token_id
    ):
        if token == tokenizer.eos_token_id:
            break
        new.append(token)
        text = tokenizer.decode(new, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            continue
        yield text[len(shown) :]
        shown = text
        if stop is not None and stop(shown):
            return
