"""Token-level scoring shared by the lm-eval adapter and the bits-per-byte evaluator.

Two ways to score a long document:
- streaming (the recurrent student): one pass, chunk by chunk, carrying the recurrent state (`cache`), so every token
  is conditioned on the whole document before it;
- windows (any HF causal LM): exactly lm-eval's `hf` scheme (disjoint windows of `max_length` tokens, each
  conditioned on the previous window's last token), so the numbers match lm-eval's bits_per_byte.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from eval.models import is_recurrent, prefix_token_id
from students.outputs import cache_kwargs, state_of


def encode_document(tokenizer, text: str) -> list[int]:
    """Token ids of `text` exactly as lm-eval's `hf` model encodes a rolling document (tokenizer defaults)."""
    prefix = tokenizer.decode([prefix_token_id(tokenizer)])
    if prefix and text.startswith(prefix):
        return tokenizer.encode(text, add_special_tokens=False)
    return tokenizer.encode(text)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _target_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [L, V], targets [L] -> (log p(target) [L], target is the argmax [L])."""
    logits = logits.float()
    logp = -F.cross_entropy(logits, targets, reduction="none")
    return logp, logits.argmax(-1) == targets


def _bar(progress: bool | str, default: str) -> dict:
    """tqdm keywords for a `progress` argument: False = no bar, True = a bar, a string = a bar so named."""
    return {"desc": progress if isinstance(progress, str) else default, "disable": not progress}


@torch.no_grad()
def stream_logprobs(
    model, tokens: list[int], chunk_size: int = 1024, progress: bool | str = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Score tokens[1:] given everything before, streaming chunks through the model's cache.

    progress: show a tqdm bar (a string names it, e.g. the text being scored).
    tokens: N ids (tokens[0] is the conditioning prefix). Returns (log p [N-1], greedy [N-1]) on CPU.
    Chunked continuation equals one full forward for the student (and for KV-cache models), so this is
    the full-sequence loss at O(chunk) memory.
    """
    ids = torch.tensor(tokens, dtype=torch.long, device=_device(model))
    state, logps, greedy = None, [], []
    for start in tqdm(range(0, len(tokens) - 1, chunk_size), **_bar(progress, "streaming")):
        end = min(start + chunk_size, len(tokens) - 1)
        out = model(ids[None, start:end], use_cache=True, **cache_kwargs(state))
        state = state_of(out)
        lp, gr = _target_logprobs(out.logits[0], ids[start + 1 : end + 1])
        logps.append(lp.cpu())
        greedy.append(gr.cpu())
    if not logps:
        return torch.zeros(0), torch.zeros(0, dtype=torch.bool)
    return torch.cat(logps), torch.cat(greedy)


@torch.no_grad()
def score_batch(model, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
    """Batched (context ids, continuation ids) -> (sum log p(continuation | context), all greedy).

    Each row's input is (context + continuation)[:-1], right-padded: a causal model's outputs at real
    positions do not depend on padding that comes after them, so no attention mask is needed. The student
    applies its LM head to the continuation positions only (the head dominates at a 49k vocabulary).
    """
    inputs = [(ctx + cont)[:-1] for ctx, cont in pairs]
    width = max(len(x) for x in inputs)
    batch = torch.zeros(len(inputs), width, dtype=torch.long, device=_device(model))
    for row, seq in enumerate(inputs):
        batch[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
    spans = [slice(len(seq) - len(cont), len(seq)) for seq, (_, cont) in zip(inputs, pairs)]
    if is_recurrent(model):
        head_input = model(batch, skip_logits=True).head_input  # [B, W, C]
        row_logits = [model.lm_head(head_input[row, span]) for row, span in enumerate(spans)]
    else:
        logits = model(batch).logits  # [B, W, V]
        row_logits = [logits[row, span] for row, span in enumerate(spans)]
    results = []
    for logits, (_, cont) in zip(row_logits, pairs):
        targets = torch.tensor(cont, dtype=torch.long, device=logits.device)
        lp, gr = _target_logprobs(logits, targets)
        results.append((float(lp.sum()), bool(gr.all())))
    return results


def rolling_windows(tokens: list[int], prefix: int, max_length: int) -> list[tuple[list[int], list[int]]]:
    """lm-eval's disjoint rolling windows: [(context ids, continuation ids)] covering every token once."""
    return [
        make_disjoint_window(w)
        for w in get_rolling_token_windows(tokens, prefix_token=prefix, max_seq_len=max_length, context_len=1)
    ]


def windowed_nll(
    model, tokens: list[int], prefix: int, max_length: int, batch_size: int = 1, progress: bool | str = False
) -> float:
    """Total NLL (nats) of `tokens` scored in lm-eval's rolling windows of `max_length` tokens (progress: as
    in stream_logprobs)."""
    windows = rolling_windows(tokens, prefix, max_length)
    total = 0.0
    for i in tqdm(range(0, len(windows), batch_size), **_bar(progress, "windows")):
        total -= sum(lp for lp, _ in score_batch(model, windows[i : i + batch_size]))
    return total
