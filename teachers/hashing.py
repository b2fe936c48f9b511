"""Content hashes that key caches: weight files, model configs, tokenizers and token files."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

# Config fields that change with the loading call, not with the model.
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "dtype", "torch_dtype",
                         "_attn_implementation", "attn_implementation", "_commit_hash")
_MEMO_NAME = "file_hashes.json"


def _sha256_stream(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def file_sha256(path: str | os.PathLike, memo_dir: str | os.PathLike | None = None) -> str:
    """sha256 of a file's bytes; memoised in memo_dir/file_hashes.json by (real path, size, mtime_ns)."""
    path = Path(path)
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    memo_path = Path(memo_dir) / _MEMO_NAME if memo_dir is not None else None
    memo = _read_memo(memo_path)
    if key in memo:
        return memo[key]
    digest = _sha256_stream(path)
    if memo_path is not None:
        memo[key] = digest
        _write_memo(memo_path, memo)
    return digest


def _read_memo(memo_path: Path | None) -> dict:
    if memo_path is None or not memo_path.is_file():
        return {}
    try:
        return json.loads(memo_path.read_text())
    except (OSError, ValueError):
        return {}  # a damaged memo only costs re-hashing


def _write_memo(memo_path: Path, memo: dict) -> None:
    """Atomic replace: concurrent writers may drop each other's entries, never corrupt the file."""
    try:
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{_MEMO_NAME}.", dir=memo_path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(memo, f)
        os.replace(tmp, memo_path)
    except OSError:
        pass  # a read-only cache dir only costs re-hashing


def config_hash(config_json: str | os.PathLike) -> str:
    """sha256 of a config.json with its volatile (loader-dependent) fields removed, keys sorted."""
    cfg = json.loads(Path(config_json).read_text())
    for key in _VOLATILE_CONFIG_KEYS:
        cfg.pop(key, None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()


def tokenizer_hash(tokenizer) -> str:
    """sha256 of what decides token ids: the fast tokenizer's JSON (or the vocab) plus its special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:
        body = json.dumps(sorted(tokenizer.get_vocab().items()))
    specials = json.dumps({k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())})
    return hashlib.sha256((body + specials).encode()).hexdigest()
