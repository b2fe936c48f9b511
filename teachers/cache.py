"""Top-k teacher-logit cache: build it once from a prepared token directory, read sparse KD targets back.

Format (directory):
  manifest.json         {"key": {...}, "n_rows", "shard_rows", "n_shards", "complete", stats}; the key holds
                        the teacher fingerprint and dtype, tokenizer hash, data hash, split, seq_len, k, value
                        dtype. A cache whose key differs from the expected one is refused, never reused.
  shard_00000.safetensors ...  rows [r0, r0 + shard_rows) of the split, tensors
                        ids int32 [rows, L, k]        top-k token ids, most probable first
                        logprobs bf16|fp16|fp32 [rows, L, k]   teacher log-softmax at temperature 1
                        tail_mass fp32 [rows, L]      1 - sum(exp(top-k log-probs)) from the fp32 values
                        and metadata {"sha256": of the three tensors' bytes, "first_row", "rows"}.
Each shard is written to a temp name and renamed, so a shard file is always whole; a killed build resumes at
the first missing shard. A shard whose checksum or shape is wrong raises CacheError when read.

Sparse-target semantics (agreed with pipeline.losses.kd_loss): the teacher distribution is the k stored
tokens plus one tail bucket holding tail_mass; the student's temperature-1 distribution is mapped onto the same
k + 1 buckets, and the temperature then acts on both bucket distributions alike.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from teachers.data import TokenDataset
from teachers.errors import CacheError, DataError

FORMAT_VERSION = 1
_VALUE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_MANIFEST = "manifest.json"
TOKEN_CHUNK = 1024  # token rows per teacher-head call: [TOKEN_CHUNK, V] fp32 logits at a time
OPEN_SHARDS = 16  # shard handles a reader keeps open (memory-mapped, so cheap)


@dataclass
class SparseTargets:
    """Top-k teacher targets: ids LongTensor [..., k], logprobs FloatTensor [..., k] (log-softmax at
    temperature 1), tail_mass FloatTensor [...] (1 - sum(exp(logprobs)), clamped to [0, 1])."""

    ids: torch.Tensor
    logprobs: torch.Tensor
    tail_mass: torch.Tensor

    @classmethod
    def stack(cls, items: list[SparseTargets]) -> SparseTargets:
        """Stack per-row targets [L, k] into a batch [B, L, k] (a DataLoader collate_fn for targets)."""
        return cls(torch.stack([t.ids for t in items]), torch.stack([t.logprobs for t in items]),
                   torch.stack([t.tail_mass for t in items]))

    def to(self, device: str | torch.device) -> SparseTargets:
        return SparseTargets(self.ids.to(device), self.logprobs.to(device), self.tail_mass.to(device))

    def flatten(self) -> SparseTargets:
        """[..., k] -> [N, k] (and tail [N]), matching student logits flattened to [N, V]."""
        k = self.ids.shape[-1]
        return SparseTargets(self.ids.reshape(-1, k), self.logprobs.reshape(-1, k), self.tail_mass.reshape(-1))

    @property
    def k(self) -> int:
        return self.ids.shape[-1]


def topk_targets(logits: torch.Tensor, k: int) -> SparseTargets:
    """Dense teacher logits [..., V] -> SparseTargets [..., k] (fp32 log-softmax, exact tail mass)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    values, ids = torch.topk(logprobs, k, dim=-1)
    # 1 - sum(p) as -expm1(logsumexp) keeps a small tail accurate instead of cancelling to 0.
    tail = (-torch.expm1(torch.logsumexp(values, dim=-1))).clamp(0.0, 1.0)
    return SparseTargets(ids, values, tail)


def cache_key(teacher, dataset_dir: str | os.PathLike, split: str, k: int, value_dtype: str) -> dict:
    """The manifest key a cache of `teacher` over dataset_dir/split must carry (pass as TeacherCache expect)."""
    meta = TokenDataset(dataset_dir, split).meta
    return {
        "format": FORMAT_VERSION,
        "teacher_fingerprint": teacher.fingerprint,
        "teacher_dtype": str(teacher.dtype).removeprefix("torch."),
        "tokenizer_hash": meta["tokenizer_hash"],
        "data_hash": meta["split_hashes"][split],
        "split": split,
        "seq_len": int(meta["seq_len"]),
        "k": int(k),
        "value_dtype": value_dtype,
    }


def _check_inputs(teacher, ds: TokenDataset, k: int, value_dtype: str) -> None:
    if value_dtype not in _VALUE_DTYPES:
        raise CacheError(f"teacher_cache.value_dtype={value_dtype!r}: use one of {sorted(_VALUE_DTYPES)}")
    if not isinstance(k, int) or not 1 <= k <= teacher.vocab_size:
        raise CacheError(f"teacher_cache.k={k!r}: must be an int in [1, {teacher.vocab_size}] (the vocab size)")
    if teacher.tokenizer_hash and ds.meta["tokenizer_hash"] != teacher.tokenizer_hash:
        raise CacheError(f"{ds.dir}: tokenized with a different tokenizer than teacher {teacher.spec!r}; "
                         "rerun the prepare stage with this teacher")
    if len(ds) == 0:
        raise CacheError(f"{ds.dir}: split {ds.split!r} has no rows; nothing to cache")


def _read_manifest(out_dir: Path) -> dict | None:
    path = out_dir / _MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError as exc:
        raise CacheError(f"{path}: unreadable manifest ({exc}); delete {out_dir} and rebuild the cache") from exc


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _key_diff(have: dict, want: dict) -> list[str]:
    return [f"{name}={have.get(name)!r} (expected {want[name]!r})" for name in want if have.get(name) != want[name]]


def _open_for_build(out_dir: Path, key: dict, n_rows: int, shard_rows: int, overwrite: bool) -> dict:
    """Existing manifest with the same key -> resume it; different key -> refuse (or wipe if overwrite)."""
    manifest = _read_manifest(out_dir)
    if manifest is not None and (_key_diff(manifest["key"], key) or manifest["shard_rows"] != shard_rows):
        if not overwrite:
            diff = _key_diff(manifest["key"], key) or [f"shard_rows={manifest['shard_rows']}"]
            raise CacheError(f"{out_dir}: holds a cache for other inputs ({'; '.join(diff[:2])}); "
                             "delete it or choose another directory")
        for p in out_dir.glob("shard_*.safetensors"):
            p.unlink()
        manifest = None
    if manifest is None:
        manifest = {"key": key, "n_rows": n_rows, "shard_rows": shard_rows,
                    "n_shards": -(-n_rows // shard_rows), "complete": False}
        out_dir.mkdir(parents=True, exist_ok=True)
        _write_json(out_dir / _MANIFEST, manifest)
    for stale in out_dir.glob(".shard_*"):
        stale.unlink()  # temp files of a killed build; never read
    return manifest


def _shard_path(out_dir: Path, i: int) -> Path:
    return out_dir / f"shard_{i:05d}.safetensors"


def _checksum(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in ("ids", "logprobs", "tail_mass"):
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _compute_rows(teacher, ds: TokenDataset, rows: range, k: int, batch_size: int, value_dtype: torch.dtype,
                  token_chunk: int) -> dict[str, torch.Tensor]:
    """Top-k targets of dataset rows -> {"ids" [R, L, k], "logprobs" [R, L, k], "tail_mass" [R, L]}."""
    ids, values, tails = [], [], []
    for start in range(rows.start, rows.stop, batch_size):
        batch = torch.stack([ds[i] for i in range(start, min(start + batch_size, rows.stop))])
        h = teacher(batch, logits=False, hidden_states=False).last_hidden_state
        flat = h.reshape(-1, h.shape[-1])
        # The head runs on token chunks so [B * L, V] logits never exist at once.
        for c in range(0, flat.shape[0], token_chunk):
            t = topk_targets(teacher.head(flat[c:c + token_chunk]), k)
            ids.append(t.ids.to("cpu", torch.int32))
            values.append(t.logprobs.to("cpu", value_dtype))
            tails.append(t.tail_mass.to("cpu", torch.float32))
    shape = (len(rows), ds.seq_len)
    return {"ids": torch.cat(ids).reshape(*shape, k), "logprobs": torch.cat(values).reshape(*shape, k),
            "tail_mass": torch.cat(tails).reshape(shape)}


def _write_shard(out_dir: Path, i: int, tensors: dict[str, torch.Tensor], first_row: int) -> None:
    path = _shard_path(out_dir, i)
    tmp = out_dir / f".{path.name}.tmp-{os.getpid()}"
    meta = {"sha256": _checksum(tensors), "first_row": str(first_row), "rows": str(tensors["ids"].shape[0])}
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    except OSError as exc:  # disk full or quota: drop the partial temp file, keep the finished shards
        tmp.unlink(missing_ok=True)
        raise CacheError(f"{path}: cannot write the cache shard ({exc.strerror or exc}); free disk space, "
                         "then rerun (finished shards are kept)") from exc


def build_teacher_cache(
    teacher,
    dataset_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    k: int = 64,
    batch_size: int = 8,
    split: str = "train",
    value_dtype: str = "bf16",
    shard_size: int = 256,
    progress: bool = True,
    overwrite: bool = False,
    token_chunk: int = TOKEN_CHUNK,
) -> dict:
    """Write top-k teacher log-probs for every token of dataset_dir/split into out_dir (resumable).

    shard_size: dataset rows per shard. overwrite=True replaces a cache built for other inputs (otherwise
    CacheError). Returns stats: rows, tokens, shards_written, seconds, tokens_per_s, bytes, bytes_per_token.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    try:
        ds = TokenDataset(dataset_dir, split)
    except DataError as exc:
        raise CacheError(str(exc)) from exc
    _check_inputs(teacher, ds, k, value_dtype)
    manifest = _open_for_build(out_dir, cache_key(teacher, dataset_dir, split, k, value_dtype), len(ds),
                               int(shard_size), overwrite)
    missing = [i for i in range(manifest["n_shards"]) if not _shard_path(out_dir, i).is_file()]
    t0, written_tokens = time.perf_counter(), 0
    done_rows = len(ds) - sum(_rows_of(manifest, i)[1] - _rows_of(manifest, i)[0] for i in missing)
    bar = tqdm(total=len(ds) * ds.seq_len, initial=done_rows * ds.seq_len, unit="tok", desc="teacher cache",
               disable=not progress)
    for i in missing:
        lo, hi = _rows_of(manifest, i)
        tensors = _compute_rows(teacher, ds, range(lo, hi), k, batch_size, _VALUE_DTYPES[value_dtype],
                                token_chunk)
        _write_shard(out_dir, i, tensors, lo)
        written_tokens += (hi - lo) * ds.seq_len
        bar.update((hi - lo) * ds.seq_len)
    bar.close()
    seconds = time.perf_counter() - t0
    size = sum(_shard_path(out_dir, i).stat().st_size for i in range(manifest["n_shards"]))
    stats = {"rows": len(ds), "tokens": len(ds) * ds.seq_len, "shards": manifest["n_shards"],
             "shards_written": len(missing), "seconds": seconds,
             "tokens_per_s": written_tokens / seconds if written_tokens else None,
             "bytes": size, "bytes_per_token": size / (len(ds) * ds.seq_len)}
    manifest.update(complete=True, stats=stats)
    _write_json(out_dir / _MANIFEST, manifest)
    return stats


def _rows_of(manifest: dict, i: int) -> tuple[int, int]:
    lo = i * manifest["shard_rows"]
    return lo, min(lo + manifest["shard_rows"], manifest["n_rows"])


class TeacherCache:
    """Reader of a finished cache: cache[i] -> SparseTargets [L, k] for dataset row i.

    expect: key fields the cache must carry (e.g. cache_key(...)); any difference is a CacheError.
    verify: check each shard's checksum the first time it is opened.
    """

    def __init__(self, out_dir: str | os.PathLike, expect: dict | None = None, verify: bool = True):
        self.dir = Path(out_dir)
        manifest = _read_manifest(self.dir)
        if manifest is None:
            raise CacheError(f"{self.dir / _MANIFEST}: not found; build the cache first (teacher_cache stage)")
        if not manifest.get("complete"):
            raise CacheError(f"{self.dir}: cache is incomplete (a build was interrupted); rerun "
                             "build_teacher_cache with the same inputs to resume it")
        diff = _key_diff(manifest["key"], expect or {})
        if diff:
            raise CacheError(f"{self.dir}: built for other inputs ({'; '.join(diff[:2])}); rebuild it "
                             "(teacher_cache stage) or delete the directory")
        self.manifest, self.key, self.verify = manifest, manifest["key"], verify
        # open shard handles, least recently used first; training reads rows in shuffled order, so one shard
        # at a time would reopen (and re-verify) a shard for almost every row
        self._open: OrderedDict[int, object] = OrderedDict()
        self._verified: set[int] = set()

    def __len__(self) -> int:
        return int(self.manifest["n_rows"])

    @property
    def k(self) -> int:
        return int(self.key["k"])

    @property
    def bytes_per_token(self) -> float:
        """Bytes on disk per cached token position (shard files / tokens)."""
        return float(self.manifest["stats"]["bytes_per_token"])

    def _shard(self, i: int):
        if i in self._open:
            self._open.move_to_end(i)
            return self._open[i]
        path = _shard_path(self.dir, i)
        try:
            handle = safe_open(str(path), framework="pt")
        except (OSError, SafetensorError) as exc:
            raise CacheError(f"{path}: missing or corrupt shard ({exc}); rebuild the cache") from exc
        if self.verify and i not in self._verified:  # each shard's checksum once per reader
            lo, hi = _rows_of(self.manifest, i)
            self._verify(path, handle, hi - lo)
            self._verified.add(i)
        self._open[i] = handle
        if len(self._open) > OPEN_SHARDS:
            self._open.popitem(last=False)
        return handle

    def _verify(self, path: Path, handle, rows: int) -> None:
        try:
            tensors = {name: handle.get_tensor(name) for name in ("ids", "logprobs", "tail_mass")}
        except (SafetensorError, RuntimeError) as exc:
            raise CacheError(f"{path}: corrupt shard ({exc}); delete it and rerun the cache build") from exc
        want = (rows, int(self.key["seq_len"]), self.k)
        if tuple(tensors["ids"].shape) != want or (handle.metadata() or {}).get("sha256") != _checksum(tensors):
            raise CacheError(f"{path}: corrupt shard (shape or checksum mismatch); delete it and rerun the "
                             "cache build to recompute it")

    def __getitem__(self, row: int) -> SparseTargets:
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range for a cache of {len(self)} rows")
        i = row // self.manifest["shard_rows"]
        r = row - i * self.manifest["shard_rows"]
        handle = self._shard(i)
        return SparseTargets(
            handle.get_slice("ids")[r : r + 1][0].long(),
            handle.get_slice("logprobs")[r : r + 1][0].float(),
            handle.get_slice("tail_mass")[r : r + 1][0].float(),
        )

    def batch(self, rows: list[int]) -> SparseTargets:
        """SparseTargets [B, L, k] for the given dataset rows."""
        return SparseTargets.stack([self[r] for r in rows])


def nominal_bytes_per_token(k: int, value_dtype: str = "bf16") -> int:
    """k int32 ids + k values + one fp32 tail per token (shard headers excluded)."""
    return k * (4 + _VALUE_DTYPES[value_dtype].itemsize) + 4


__all__ = ["CacheError", "SparseTargets", "TeacherCache", "build_teacher_cache", "cache_key",
           "nominal_bytes_per_token", "topk_targets"]
