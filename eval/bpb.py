"""Bits-per-byte and perplexities of a causal LM on a text, counted the way lm-eval counts them.

bits/byte = NLL_nats / (ln 2 * UTF-8 bytes of the text); byte perplexity = exp(NLL / bytes); word
perplexity = exp(NLL / words) with words = len(re.split(r"\\s+", text)) (lm-eval's count). The text is
scored as one document after one prefix token (the tokenizer's BOS, else EOS), under a named protocol
(eval/scoring.py): windows of W tokens with stride S, each led by the prefix (student and teacher alike, the
protocol of every table), or one streamed pass (the recurrent student, an extra column).

An interval beside a score (`block_bytes`): a percentile bootstrap over consecutive blocks of the text's
bytes (every token's NLL goes to the block holding its last byte), so the blocks are the same for every
model and tokenizer, student and teacher alike; it measures how much the score would move on other text of
the same kind, not run-to-run noise.
"""

from __future__ import annotations

import lzma
import math
import re
from pathlib import Path

import numpy as np
import torch

from eval import EvalError
from eval.models import can_stream, prefix_token_id, window_length
from eval.scoring import Protocol, encode_document, protocol_token_nll

# The interval beside a held-out score: blocks of 4 KiB, longer than a 512-token scoring window's context at
# the teacher's ~4.4 bytes/token, so most of what a block's tokens are conditioned on lies inside it; 100 kB
# of text gives ~24 blocks. 2,000 resamples, seeded: the same scores always give the same interval.
BOOTSTRAP_BLOCK_BYTES = 4096
BOOTSTRAP_REPLICATES = 2000
BOOTSTRAP_LEVEL = 0.95


def count_words(text: str) -> int:
    """Whitespace-separated words, as lm-eval counts them for word_perplexity."""
    return len(re.split(r"\s+", text))


def document_nll(
    model, tokenizer, text: str, protocol: Protocol, batch_size: int = 1, progress: bool | str = False
) -> tuple[float, torch.Tensor, list[int], Protocol]:
    """(total NLL in nats, per-token NLL [N] float64, the N scored token ids, the protocol used) of `text`
    as one document.

    "windows": see eval/scoring.py; the window is capped by a student's max_position when its config sets one.
    "stream": the student's recurrent pass in chunks of `protocol.window` tokens; a model that cannot stream
    the text (not a SpikeGPT student, or a text beyond its max_position) raises EvalError.
    """
    tokens = encode_document(tokenizer, text)
    prefix = prefix_token_id(tokenizer)
    if protocol.kind == "stream" and not can_stream(model, len(tokens) + 1):
        raise EvalError(
            f"bits/byte: {getattr(model.config, 'model_type', 'this model')} cannot stream {len(tokens)} tokens "
            "through a recurrent state; use the windows protocol"
        )
    if protocol.kind == "windows":
        window = window_length(model, protocol.window)
        if window != protocol.window:
            protocol = Protocol("windows", window, min(protocol.step, window))
    total, per_token = protocol_token_nll(model, tokens, prefix, protocol, batch_size, progress)
    return total, per_token, tokens, protocol


def evaluate_bpb(
    model,
    tokenizer,
    text: str,
    context_length: int = 1024,
    batch_size: int = 1,
    progress: bool | str = False,
    stride: int | None = None,
    protocol: str = "windows",
    block_bytes: int | None = None,
) -> dict:
    """Bits/byte, byte and word perplexity of `text` under one protocol.

    context_length: the window W (windows) or the chunk size (stream); stride: the windows' stride S (default
    W // 2); protocol: "windows" (any model; every table's protocol) or "stream" (the student only);
    block_bytes: add "interval", a 95% percentile bootstrap of bits/byte over blocks of that many bytes
    (`bootstrap_interval`; None when the text has fewer than 2 blocks or the tokenizer gives no offsets).
    Returns {"bits_per_byte", "byte_perplexity", "word_perplexity", "tokens", "bytes", "words", "nll_sum",
    "protocol": {"kind", "window", "stride", "text"}} (nll_sum in nats), plus "interval" when asked. Raises
    EvalError on an empty text or a bad protocol.
    """
    if not text:
        raise EvalError("evaluate_bpb: the text is empty; pass a non-empty text or file")
    nll, per_token, tokens, used = document_nll(
        model, tokenizer, text, Protocol(protocol, context_length, stride), batch_size, progress
    )
    n_bytes, n_words = len(text.encode("utf-8")), count_words(text)
    out = {
        "bits_per_byte": nll / n_bytes / math.log(2),
        "byte_perplexity": math.exp(nll / n_bytes),
        "word_perplexity": math.exp(nll / n_words),
        "tokens": len(tokens),
        "bytes": n_bytes,
        "words": n_words,
        "nll_sum": nll,
        "protocol": used.as_dict(),
    }
    if block_bytes:
        ends = token_byte_ends(tokenizer, text, tokens)
        out["interval"] = None if ends is None else bootstrap_interval(
            *block_sums(per_token.numpy(), ends, n_bytes, block_bytes), block_bytes=block_bytes)
    return out


def token_byte_ends(tokenizer, text: str, tokens: list[int]) -> list[int] | None:
    """The UTF-8 byte offset just past each token of `text` (its last byte + 1), from the tokenizer's
    character offsets of the text read literally (special-token spellings stay text); None when it has none (a
    slow tokenizer) or they belong to other token ids than `tokens`."""
    try:
        enc = tokenizer(text, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
    except (NotImplementedError, TypeError, ValueError):
        return None
    if list(enc["input_ids"]) != list(tokens):
        return None
    cum = [0]
    for ch in text:
        cum.append(cum[-1] + len(ch.encode("utf-8")))
    return [cum[end] for _, end in enc["offset_mapping"]]


def block_sums(token_nll, byte_ends, n_bytes: int, block_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    """(NLL per block [K], bytes per block [K]) for K = ceil(n_bytes / block_bytes) consecutive blocks of the
    text's bytes (the last one shorter): each token's NLL goes to the block holding its last byte."""
    if block_bytes < 1 or n_bytes < 1:
        raise EvalError(f"block_sums: need block_bytes >= 1 and a non-empty text, got {block_bytes}, {n_bytes}")
    n_blocks = -(-n_bytes // block_bytes)
    where = np.clip((np.asarray(byte_ends, dtype=np.int64) - 1) // block_bytes, 0, n_blocks - 1)
    nll = np.bincount(where, weights=np.asarray(token_nll, dtype=np.float64), minlength=n_blocks)
    sizes = np.full(n_blocks, float(block_bytes))
    sizes[-1] = n_bytes - block_bytes * (n_blocks - 1)
    return nll, sizes


def bootstrap_interval(block_nll, block_sizes, block_bytes: int | None = None,
                       replicates: int = BOOTSTRAP_REPLICATES, level: float = BOOTSTRAP_LEVEL,
                       seed: int = 0) -> dict | None:
    """Percentile bootstrap (Efron & Tibshirani 1993, ch. 13) of bits/byte = sum NLL / (ln 2 * sum bytes)
    over K blocks drawn with replacement, K at a time, `replicates` times (numpy, seeded).

    block_nll, block_sizes: [K] nats and bytes per block (`block_sums`). Returns {"low", "high",
    "half_width", "level", "blocks", "block_bytes", "replicates", "method"} (bits/byte), or None for K < 2.
    """
    nll, sizes = np.asarray(block_nll, dtype=np.float64), np.asarray(block_sizes, dtype=np.float64)
    if len(nll) < 2:
        return None
    draws = np.random.default_rng(seed).integers(0, len(nll), size=(replicates, len(nll)))
    stats = nll[draws].sum(axis=1) / sizes[draws].sum(axis=1) / math.log(2)
    tail = 50 * (1 - level)
    low, high = (float(x) for x in np.percentile(stats, [tail, 100 - tail]))
    return {"low": low, "high": high, "half_width": (high - low) / 2, "level": level, "blocks": len(nll),
            "block_bytes": block_bytes, "replicates": replicates,
            "method": f"percentile bootstrap over {len(nll)} blocks of {block_bytes or 'given'} bytes, "
                      f"{replicates} resamples, seed {seed}"}


def cut_text(text: str, max_bytes: int | None) -> str:
    """The first `max_bytes` UTF-8 bytes of `text`, cut back to the last line end within them (the whole
    text when it is shorter or max_bytes is None; a text without a line end there is cut at the byte limit,
    never inside a character)."""
    raw = text.encode("utf-8")
    if not max_bytes or len(raw) <= max_bytes:
        return text
    head = raw[:max_bytes].decode("utf-8", errors="ignore")
    cut = head.rfind("\n")
    return head[: cut + 1] if cut > 0 else head


def read_eval_text(name_or_path: str) -> str:
    """A bundled held-out text by name ("persuasion", "hamlet": teachers/corpus/*_eval_<name>.txt.xz) or
    any UTF-8 text file (.txt, or .xz compressed)."""
    path = Path(name_or_path)
    if not path.is_file():
        from importlib.resources import files

        corpus = Path(str(files("teachers") / "corpus"))
        matches = sorted(corpus.glob(f"*_eval_{name_or_path.lower()}.txt.xz"))
        if not matches:
            bundled = sorted(p.name.split("_eval_")[1].split(".")[0] for p in corpus.glob("*_eval_*.txt.xz"))
            raise EvalError(
                f"{name_or_path}: neither a file nor a bundled held-out text (bundled: "
                f"{', '.join(bundled)}); pass a path to a UTF-8 .txt file"
            )
        path = matches[0]
    if path.suffix == ".xz":
        with lzma.open(path) as f:
            raw = f.read()
    else:
        raw = path.read_bytes()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise EvalError(f"{path}: not UTF-8 text (byte {exc.start}); convert it with iconv -t utf-8") from exc
