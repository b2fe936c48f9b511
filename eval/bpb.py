"""Bits-per-byte and perplexities of a causal LM on a text, counted the way lm-eval counts them.

bits/byte = NLL_nats / (ln 2 * UTF-8 bytes of the text); byte perplexity = exp(NLL / bytes); word
perplexity = exp(NLL / words) with words = len(re.split(r"\\s+", text)) (lm-eval's count). The text is
scored as one document after one prefix token (the tokenizer's BOS, else EOS), under a named protocol
(eval/scoring.py): windows of W tokens with stride S, each led by the prefix (student and teacher alike, the
protocol of every table), or one streamed pass (the recurrent student, an extra column).
"""

from __future__ import annotations

import lzma
import math
import re
from pathlib import Path

from eval import EvalError
from eval.models import can_stream, prefix_token_id, window_length
from eval.scoring import Protocol, encode_document, protocol_nll


def count_words(text: str) -> int:
    """Whitespace-separated words, as lm-eval counts them for word_perplexity."""
    return len(re.split(r"\s+", text))


def document_nll(
    model, tokenizer, text: str, protocol: Protocol, batch_size: int = 1, progress: bool | str = False
) -> tuple[float, int, Protocol]:
    """(total NLL in nats, number of scored tokens, the protocol used) of `text` as one document.

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
    return protocol_nll(model, tokens, prefix, protocol, batch_size, progress), len(tokens), protocol


def evaluate_bpb(
    model,
    tokenizer,
    text: str,
    context_length: int = 1024,
    batch_size: int = 1,
    progress: bool | str = False,
    stride: int | None = None,
    protocol: str = "windows",
) -> dict:
    """Bits/byte, byte and word perplexity of `text` under one protocol.

    context_length: the window W (windows) or the chunk size (stream); stride: the windows' stride S (default
    W // 2); protocol: "windows" (any model; every table's protocol) or "stream" (the student only).
    Returns {"bits_per_byte", "byte_perplexity", "word_perplexity", "tokens", "bytes", "words", "nll_sum",
    "protocol": {"kind", "window", "stride", "text"}} (nll_sum in nats). Raises EvalError on an empty text or
    a bad protocol.
    """
    if not text:
        raise EvalError("evaluate_bpb: the text is empty; pass a non-empty text or file")
    nll, n_tokens, used = document_nll(
        model, tokenizer, text, Protocol(protocol, context_length, stride), batch_size, progress
    )
    n_bytes, n_words = len(text.encode("utf-8")), count_words(text)
    return {
        "bits_per_byte": nll / n_bytes / math.log(2),
        "byte_perplexity": math.exp(nll / n_bytes),
        "word_perplexity": math.exp(nll / n_words),
        "tokens": n_tokens,
        "bytes": n_bytes,
        "words": n_words,
        "nll_sum": nll,
        "protocol": used.as_dict(),
    }


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
