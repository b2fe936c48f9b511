"""A teacher's sizes without loading its weights: what the pipeline checks before any stage runs.

`describe_teacher(spec)` resolves the spec as `load_teacher` does (a bundled alias or a GGUF file is converted
once, a Hub id is downloaded or taken from the cache; offline and uncached is the one-line "no network"
TeacherError), then reads the config (transformers' AutoConfig, which maps GPT-2's n_embd and the like onto
hidden_size) and counts parameters from the safetensors headers (8-byte length + JSON of dtypes and shapes).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from teachers.errors import TeacherError
from teachers.loading import _resolve_dir, cache_root, read_config

_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass(frozen=True)
class TeacherShape:
    """Sizes of a causal-LM teacher. embed_width is the width of its input embedding (OPT's
    word_embed_proj_dim, else hidden); max_positions is None when the config sets no limit."""

    spec: str
    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    intermediate: int
    vocab: int
    embed_width: int
    max_positions: int | None
    parameters: int


def describe_teacher(spec: str | os.PathLike, trust_remote_code: bool = False,
                     cache_dir: str | os.PathLike | None = None) -> TeacherShape:
    """The TeacherShape of `spec` (any spec load_teacher takes); TeacherError naming the spec and the fix."""
    model_dir = _resolve_dir(str(spec), cache_root(cache_dir))
    config = read_config(model_dir, spec, trust_remote_code)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = int(text.hidden_size)
    heads = int(text.num_attention_heads)
    intermediate = next((v for k in ("intermediate_size", "ffn_dim", "n_inner")
                         if isinstance(v := getattr(text, k, None), int)), 4 * hidden)
    positions = next((v for k in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
                      if isinstance(v := getattr(text, k, None), int) and v > 0), None)
    return TeacherShape(
        spec=str(spec), model_type=str(config.model_type), layers=int(text.num_hidden_layers), hidden=hidden,
        heads=heads, kv_heads=int(getattr(text, "num_key_value_heads", None) or heads), intermediate=intermediate,
        vocab=int(text.vocab_size), embed_width=int(getattr(text, "word_embed_proj_dim", None) or hidden),
        max_positions=positions, parameters=count_parameters(model_dir, config))


def count_parameters(model_dir: Path, config=None) -> int:
    """Parameters in the weight files of `model_dir`: exact from safetensors headers; a *.bin file counts its
    bytes over the config's dtype size (4 when unknown)."""
    total = 0
    for path in sorted(Path(model_dir).iterdir()):
        if path.suffix == ".safetensors":
            total += _safetensors_numel(path)
        elif path.suffix == ".bin":
            dtype = str(getattr(config, "torch_dtype", None) or getattr(config, "dtype", None) or "float32")
            total += path.stat().st_size // _DTYPE_BYTES.get(dtype.removeprefix("torch."), 4)
    if total == 0:
        raise TeacherError(f"{model_dir}: no weight files (*.safetensors/*.bin) found; re-download the teacher")
    return total


def _safetensors_numel(path: Path) -> int:
    try:
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(size))
    except (OSError, ValueError, struct.error) as exc:
        raise TeacherError(f"{path}: unreadable safetensors header ({type(exc).__name__}); re-download the "
                           "teacher") from None
    return sum(math.prod(v["shape"]) for k, v in header.items() if k != "__metadata__")
