"""Token-level scoring shared by the lm-eval adapter and the bits-per-byte evaluator.

A document is its tokens without special tokens, t_1..t_N, scored after one prefix token p (the tokenizer's
BOS, else its EOS, as lm-eval conditions documents), so a tokenizer that adds BOS itself gets exactly one. Its
text is encoded literally (`encode_document`): text that spells a special token is scored as the text it is.
Three ways to score a long document:
- windows (`Protocol("windows", W, S)`, the protocol of every student-vs-teacher table): model inputs of at
  most W tokens, each starting with p, then up to W-1 document tokens (scoring up to W: the last input token
  predicts one more); a window advances by S tokens and scores only the tokens no earlier window scored (the
  first scores all W), so every scored token after the first window sees at least W-S earlier document
  tokens. S = W gives disjoint windows. Any causal LM, student or teacher, with p at the start of every window
  (Gemma-3 and Llama-family teachers need their BOS there);
- stream (the recurrent student only): one pass, chunk by chunk, carrying the recurrent state (`cache`), so every
  token is conditioned on the whole document before it (the chunk size changes memory, not the result);
- lm-eval's own rolling windows (`rolling_windows`, `windowed_nll`): disjoint windows of `max_length` tokens,
  each conditioned on the previous window's last token, only the first led by p: kept to check agreement
  with lm-eval's `hf` model.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm.auto import tqdm

from eval import EvalError
from eval.models import is_recurrent
from students.outputs import cache_kwargs, state_of


@dataclass(frozen=True)
class Protocol:
    """How a long document is scored: kind "windows" (window W tokens per model input, prefix included, and
    stride S) or "stream" (the student's recurrent pass; window = chunk size, stride unused)."""

    kind: str = "windows"
    window: int = 1024
    stride: int | None = None  # None: half a window (W // 2)

    def __post_init__(self):
        if self.kind not in ("windows", "stream"):
            raise EvalError(f"bits/byte protocol must be 'windows' or 'stream', got {self.kind!r}")
        if self.window < 2:
            raise EvalError(f"bits/byte window must be >= 2 tokens (the prefix and one token), got {self.window}")
        if self.kind == "windows" and not 1 <= self.step <= self.window:
            raise EvalError(
                f"bits/byte stride must be in 1..window = 1..{self.window}, got {self.stride}; pass a stride "
                "no larger than the context"
            )

    @property
    def step(self) -> int:
        """The stride in tokens (half a window when not set)."""
        return self.stride if self.stride is not None else max(1, self.window // 2)

    def describe(self) -> str:
        """One line naming the protocol, for tables."""
        if self.kind == "stream":
            return "one streamed pass through the recurrent state, led by the prefix token"
        return (
            f"windows of {self.window} tokens, stride {self.step}, each window led by the prefix token (BOS, "
            f"else EOS)"
        )

    def as_dict(self) -> dict:
        return {"kind": self.kind, "window": self.window, "stride": self.step if self.kind == "windows" else None,
                "text": self.describe()}


def encode_document(tokenizer, text: str) -> list[int]:
    """Token ids of `text` without any special token the tokenizer would add (the caller adds the one prefix),
    the text read literally: text that spells a special token ("<|endoftext|>") stays text, so no special id
    is scored that the text does not hold."""
    return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front of a text by itself (Llama, Gemma), as opposed to a plain one."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer.encode("a", add_special_tokens=True)
    return bool(with_special) and with_special[0] == bos and tokenizer.encode("a", add_special_tokens=False)[:1] != [bos]


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
    return [(float(lp.sum()), bool(gr.all())) for lp, gr in score_batch_tokens(model, pairs)]


@torch.no_grad()
def score_batch_tokens(model, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """As `score_batch`, per continuation token: [(log p [len(continuation)], greedy [len(continuation)])],
    float32 and bool, on the model's device."""
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
        results.append(_target_logprobs(logits, targets))
    return results


def protocol_windows(tokens: list[int], prefix: int, window: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """Windows of the "windows" protocol as [(context ids, continuation ids)], covering every token once.

    Each context starts with `prefix`; the model input (context + continuation minus its last token, see
    `score_batch`) is at most `window` tokens; window k starts at document token k * stride."""
    pairs, begin, done = [], 0, 0
    while done < len(tokens):
        end = min(begin + window, len(tokens))
        pairs.append(([prefix] + tokens[begin:done], tokens[done:end]))
        done, begin = end, begin + stride
    return pairs


def protocol_nll(
    model, tokens: list[int], prefix: int, protocol: Protocol, batch_size: int = 1, progress: bool | str = False
) -> float:
    """Total NLL (nats) of `tokens` (no special tokens) under `protocol`, after one `prefix` token (progress:
    a tqdm bar, a string names it)."""
    return protocol_token_nll(model, tokens, prefix, protocol, batch_size, progress)[0]


def protocol_token_nll(
    model, tokens: list[int], prefix: int, protocol: Protocol, batch_size: int = 1, progress: bool | str = False
) -> tuple[float, torch.Tensor]:
    """(total NLL in nats, per-token NLL [len(tokens)] float64 on CPU) of `tokens` under `protocol`.

    The total is summed window by window (windows) or in float64 (stream), as `protocol_nll` reports it; the
    per-token NLLs are what a bootstrap over blocks of the text resamples (eval/bpb.py)."""
    if protocol.kind == "stream":
        logps, _ = stream_logprobs(model, [prefix] + tokens, chunk_size=protocol.window, progress=progress)
        nll = -logps.double()
        return float(nll.sum()), nll
    pairs = protocol_windows(tokens, prefix, protocol.window, protocol.step)
    total, parts = 0.0, []
    for i in tqdm(range(0, len(pairs), batch_size), **_bar(progress, "windows")):
        for lp, _ in score_batch_tokens(model, pairs[i : i + batch_size]):
            total -= float(lp.sum())
            parts.append(-lp.double().cpu())
    return total, (torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64))


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
