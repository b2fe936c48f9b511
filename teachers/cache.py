"""Top-k teacher-logit cache: build it once from a prepared token directory, read sparse KD targets back.

Format (directory):
  manifest.json         {"key": {...}, "n_rows", "shard_rows", "n_shards", "complete", stats}; the key holds
                        the format version, teacher fingerprint and dtype, tokenizer hash, data hash, split,
                        seq_len, k, value dtype and temperature. A cache whose key differs from the expected one
                        is refused, never reused; so is a cache of another format version.
  shard_00000.safetensors ...  rows [r0, r0 + shard_rows) of the split, tensors
                        ids int32 [rows, L, k]        top-k token ids of softmax(z / tau), most probable first
                        logprobs bf16|fp16|fp32 [rows, L, k]   log softmax(z / tau) of those ids
                        tail_mass fp32 [rows, L]      the mass softmax(z / tau) puts on every other token
                        and metadata {"sha256": of the three tensors' bytes, "first_row", "rows"}.
Each shard is written to a temp name and renamed, so a shard file is always whole; a killed build resumes at
the first missing shard. A shard whose checksum or shape is wrong raises CacheError when read.

Sparse-target semantics (agreed with pipeline.losses.kd_loss): the cache holds the teacher distribution at
the distillation temperature tau, q = softmax(z / tau) over the full vocabulary, as its k most probable tokens
plus one tail bucket holding the rest of its mass. The student's tempered distribution softmax(s / tau) is
mapped onto the same k + 1 buckets, and the loss is tau^2 KL between the two bucket distributions: a lower
bound on the full-vocabulary tau^2 KL (data-processing inequality), exact on the k ids' gradients. The
temperature is part of the key because the top-k of softmax(z / tau) and its tail mass cannot be recovered
from those of another temperature: at tau = 2 the bundled teacher puts 79% of its mass outside its top 64
(bench/kd_cache.py), which a temperature-1 cache tempered as one bucket made 7%. Format 1 (before) stored
temperature-1 targets and tempered the buckets; it is refused.

A dataset tokenized with a student vocabulary derived from the teacher's (meta.json "vocab" = subset:N |
bytes) gets the same format over the STUDENT's vocabulary: ids are student ids, the values the top-k of the
tempered exact distribution of the next student token (teachers.subvocab), built from the rows' teacher
views. Its key adds "vocab" (the spelling) and "targets" (SUBVOCAB_TARGETS, the derivation's format marker,
followed by " branch_floor=<eps>" when the branch tokens of relative ending mass below eps were skipped, so that
caches of different floors are never read for one another; teachers.subvocab.exact_log_probs). The build's
stats (the teacher_cache stage's metrics) add "branches": its BranchCount (positions, branch tokens needed and
evaluated, the skipped branches' summed and largest relative ending mass, i.e. total-variation bounds).

The hidden store (build_teacher_cache(store="hidden"), recipe key teacher_cache.store) keeps instead what
the teacher's LM head reads, its last hidden state (after the final norm), and the head itself, so the loss
recomputes the teacher's full-vocabulary logits z = head(h) chunk by chunk, exactly as the online teacher
does: KD at any temperature and of any kind (forward KL, reverse KL, JSD) equals the online loss up to the
stored dtype's rounding of h, which the top-k store cannot reach at tau >= 2 (the tail's inner shape is lost).
Its price: [L, C_t] values per row instead of [L, k] ids + values (576 bf16 = 1,152 bytes a token for
SmolLM2-135M against 388 for k = 64) and one [N, C_t] x [C_t, V] teacher-head matmul per step. Directory:
  manifest.json           key: format HIDDEN_FORMAT, teacher fingerprint and dtype, tokenizer and data hashes,
                          split, seq_len, value_dtype, width C_t, vocab V, the head's sha256 and soft-cap; no k
                          and no temperature (one cache serves every temperature and KD kind)
  head.safetensors        weight fp32 [V, C_t] (and bias [V] if the head has one), written before any shard
  shard_00000.safetensors hidden bf16|fp16|fp32 [rows, L, C_t], same shard machinery as above.
It is built over the teacher's own vocabulary only: exact targets over a derived student vocabulary are mixtures
of several teacher positions (teachers.subvocab), which no single hidden state gives.

The shard machinery (manifest and key check, resumable build, checksummed shards, a reader that verifies each
shard once) is generic over a `ShardFormat`; teachers.feature_cache stores the teacher's SpAD targets with it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from teachers.data import TokenDataset
from teachers.errors import CacheError, DataError
from teachers.hashing import tokenizer_hash
from teachers.outputs import soft_cap

FORMAT_VERSION = 2  # 2: targets of the tempered teacher, keyed by temperature
HIDDEN_FORMAT = "hidden/1"  # the hidden store: the teacher head's input and the head
STORES = ("topk", "hidden")
_HEAD_FILE = "head.safetensors"
SUBVOCAB_TARGETS = "exact-subset/1"  # bump when teachers.subvocab's targets change
_VALUE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_MANIFEST = "manifest.json"
TOKEN_CHUNK = 1024  # token rows per teacher-head call: [TOKEN_CHUNK, V] fp32 logits at a time
OPEN_SHARDS = 16  # shard handles a reader keeps open (memory-mapped, so cheap)


@dataclass
class SparseTargets:
    """Top-k teacher targets at one temperature tau: ids LongTensor [..., k], logprobs FloatTensor [..., k]
    (log softmax(z / tau) of those ids), tail_mass FloatTensor [...] (the mass of softmax(z / tau) outside the
    k ids, in [0, 1])."""

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


def topk_targets(logits: torch.Tensor, k: int, temperature: float = 1.0) -> SparseTargets:
    """Teacher rows [..., V] -> SparseTargets [..., k] of the tempered distribution q = softmax(logits / tau).

    logits: logits or log-probabilities over a vocabulary of V tokens (any row-wise constant shift gives the
    same q). The k most probable tokens of q with their fp32 log-probabilities, and the tail mass, the sum of
    q over the other V - k tokens (a direct sum, accurate when it is tiny; 0 when k = V). Raises CacheError
    for a temperature that is not > 0 or k outside [1, V].
    """
    _check_temperature(temperature)
    if not 1 <= k <= logits.shape[-1]:
        raise CacheError(f"k={k!r}: must be in [1, {logits.shape[-1]}] (teacher_cache.k)")
    z = logits.float()
    # shifted by the row maximum before dividing, so a small tau does not scale the logits' rounding error
    logprobs = torch.log_softmax((z - z.amax(dim=-1, keepdim=True)) / temperature, dim=-1)
    values, ids = torch.topk(logprobs, k, dim=-1)
    tail = torch.logsumexp(logprobs.scatter(-1, ids, float("-inf")), dim=-1).exp().clamp(0.0, 1.0)
    return SparseTargets(ids, values, tail)


def vocab_key(meta: dict, branch_floor: float = 0.0) -> dict:
    """The key fields a dataset's student vocabulary adds: none for the teacher's own, else "vocab" and
    "targets" (so a cache of exact subset-vocabulary targets is never read for other targets, nor for those of
    another branch_floor: teacher_cache.branch_floor, ignored for the teacher's own vocabulary)."""
    vocab = meta.get("vocab", "teacher")
    if vocab == "teacher":
        return {}
    targets = SUBVOCAB_TARGETS if branch_floor == 0 else f"{SUBVOCAB_TARGETS} branch_floor={float(branch_floor)!r}"
    return {"vocab": vocab, "targets": targets}


def cache_key(teacher, dataset_dir: str | os.PathLike, split: str, k: int, value_dtype: str,
              temperature: float = 1.0, branch_floor: float = 0.0) -> dict:
    """The manifest key a cache of `teacher` over dataset_dir/split at `temperature` (and, over a derived
    student vocabulary, `branch_floor`) must carry (pass as TeacherCache expect)."""
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
        "temperature": float(temperature),
        **vocab_key(meta, branch_floor),
    }


def _check_temperature(temperature: float) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0 < temperature < math.inf:
        raise CacheError(f"temperature={temperature!r}: must be a finite number > 0 (distill.kd.temperature)")


def _open_split(dataset_dir: str | os.PathLike, split: str) -> TokenDataset:
    """The prepared split a cache is built over (a DataError becomes a CacheError)."""
    try:
        return TokenDataset(dataset_dir, split)
    except DataError as exc:
        raise CacheError(str(exc)) from exc


def _check_inputs(teacher, ds: TokenDataset, k: int, value_dtype: str, temperature: float, vocab,
                  branch_floor: float) -> None:
    """The top-k store's arguments, then `_check_data`."""
    _check_temperature(temperature)
    if isinstance(branch_floor, bool) or not isinstance(branch_floor, (int, float)) or not 0 <= branch_floor < 1:
        raise CacheError(f"branch_floor={branch_floor!r}: must be a number in [0, 1) (teacher_cache.branch_floor)")
    size = teacher.vocab_size if vocab is None else vocab.student_size
    if not isinstance(k, int) or not 1 <= k <= size:
        raise CacheError(f"teacher_cache.k={k!r}: must be an int in [1, {size}] (the vocab size)")
    _check_data(teacher, ds, value_dtype, vocab)


def _check_data(teacher, ds: TokenDataset, value_dtype: str, vocab) -> None:
    """What every logit store needs: a known value dtype, the dataset's tokenizer, at least one row."""
    if value_dtype not in _VALUE_DTYPES:
        raise CacheError(f"teacher_cache.value_dtype={value_dtype!r}: use one of {sorted(_VALUE_DTYPES)}")
    _check_tokenizer(teacher, ds, vocab)
    if len(ds) == 0:
        raise CacheError(f"{ds.dir}: split {ds.split!r} has no rows; nothing to cache")


def _check_tokenizer(teacher, ds: TokenDataset, vocab) -> None:
    """The dataset was tokenized by the teacher's tokenizer, or by the student tokenizer of `vocab`."""
    derived = ds.meta.get("vocab", "teacher") != "teacher"
    if derived and vocab is None:
        raise CacheError(f"{ds.dir}: tokenized with student.vocab={ds.meta['vocab']}; its cache needs the "
                         "VocabMap of that vocabulary (build_teacher_cache(vocab=...))")
    if vocab is not None and (not derived or ds.meta["tokenizer_hash"] != tokenizer_hash(vocab.student_tokenizer)):
        raise CacheError(f"{ds.dir}: not tokenized with the student tokenizer of student.vocab={vocab.spec}; "
                         "rerun the prepare stage")
    if vocab is None and teacher.tokenizer_hash and ds.meta["tokenizer_hash"] != teacher.tokenizer_hash:
        raise CacheError(f"{ds.dir}: tokenized with a different tokenizer than teacher {teacher.spec!r}; "
                         "rerun the prepare stage with this teacher")


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


@dataclass(frozen=True)
class ShardFormat:
    """One kind of sharded cache. version: its key's "format" (a cache of another version is refused);
    about: what this version's shards hold, for that refusal; builder: what resumes an interrupted build;
    shapes(key) -> {tensor name: shape of one dataset row} for every tensor a shard holds ([rows, *shape])."""

    version: int | str
    about: str
    builder: str
    shapes: Callable[[dict], dict[str, tuple[int, ...]]]


def _logit_shapes(key: dict) -> dict[str, tuple[int, ...]]:
    length, k = int(key["seq_len"]), int(key["k"])
    return {"ids": (length, k), "logprobs": (length, k), "tail_mass": (length,)}


LOGITS = ShardFormat(FORMAT_VERSION, "top-k of the teacher at the distillation temperature", "build_teacher_cache",
                     _logit_shapes)


# what a shard that fails its check needs: the teacher_cache stage is done, so a plain rerun skips it
REBUILD = ("rerun the teacher_cache stage (spikedistill run <recipe> --stages teacher_cache --force; a shared "
           "teacher_cache.dir keeps its other shards and recomputes only the missing ones)")
_STORE_OF_FORMAT = {FORMAT_VERSION: "topk", HIDDEN_FORMAT: "hidden"}


def _check_format(out_dir: Path, manifest: dict, fmt: ShardFormat = LOGITS) -> None:
    """A cache of another format version is refused with one line (its targets mean something else); one of the
    other teacher_cache.store is named as such, since deleting a shared one would be the wrong fix."""
    have = manifest.get("key", {}).get("format")
    stores = (_STORE_OF_FORMAT.get(have), _STORE_OF_FORMAT.get(fmt.version))
    if have != fmt.version and None not in stores:
        raise CacheError(f"{out_dir}: holds a teacher cache of teacher_cache.store={stores[0]}, this run asks for "
                         f"store={stores[1]}; set teacher_cache.store={stores[0]} to read it, or choose another "
                         "teacher_cache.dir")
    if have != fmt.version:
        raise CacheError(f"{out_dir}: teacher cache format {have}, this version reads format {fmt.version} "
                         f"({fmt.about}); delete the directory and rebuild it (teacher_cache stage)")


def _key_diff(have: dict, want: dict) -> list[str]:
    return [f"{name}={have.get(name)!r} (expected {want[name]!r})" for name in want if have.get(name) != want[name]]


def _open_for_build(out_dir: Path, fmt: ShardFormat, key: dict, n_rows: int, shard_rows: int,
                    overwrite: bool) -> dict:
    """Existing manifest with the same key -> resume it; different key -> refuse (or wipe if overwrite)."""
    manifest = _read_manifest(out_dir)
    if manifest is not None and not overwrite:
        _check_format(out_dir, manifest, fmt)
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
    """sha256 of the tensors' bytes in name order (for the logit cache: ids, logprobs, tail_mass)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(tensors[name].contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _compute_rows(teacher, ds: TokenDataset, rows: range, k: int, batch_size: int, value_dtype: torch.dtype,
                  token_chunk: int, temperature: float, exact=None) -> dict[str, torch.Tensor]:
    """Top-k targets at `temperature` of dataset rows -> {"ids" [R, L, k], "logprobs" [R, L, k],
    "tail_mass" [R, L]}; with `exact` (an _Exact), of the exact targets over the student's vocabulary."""
    ids, values, tails = [], [], []
    for start in range(rows.start, rows.stop, batch_size):
        batch = range(start, min(start + batch_size, rows.stop))
        # The head runs on token chunks so [B * L, V] logits never exist at once.
        for logits in _row_logits(teacher, ds, batch, token_chunk, exact):
            t = topk_targets(logits, k, temperature)
            ids.append(t.ids.to("cpu", torch.int32))
            values.append(t.logprobs.to("cpu", value_dtype))
            tails.append(t.tail_mass.to("cpu", torch.float32))
    shape = (len(rows), ds.seq_len)
    return {"ids": torch.cat(ids).reshape(*shape, k), "logprobs": torch.cat(values).reshape(*shape, k),
            "tail_mass": torch.cat(tails).reshape(shape)}


@dataclass
class _Exact:
    """How a build derives targets over a student vocabulary: the teachers.subvocab.PieceTrie, the branch floor
    and the BranchCount the build adds its branch tokens to."""

    trie: object
    branch_floor: float
    count: object


def _row_logits(teacher, ds: TokenDataset, batch: range, token_chunk: int, exact: _Exact | None):
    """Chunks of [n, V] next-token logits of the batch's positions, row-major: the teacher's own head, or the
    exact log-probs over the student's vocabulary (zero-mass tokens at log MASS_FLOOR)."""
    if exact is None:
        h = teacher(torch.stack([ds[i] for i in batch]), logits=False, hidden_states=False).last_hidden_state
        flat = h.reshape(-1, h.shape[-1])
        return (teacher.head(flat[c:c + token_chunk]) for c in range(0, flat.shape[0], token_chunk))
    from teachers.subvocab import exact_log_probs, floored

    views = [ds.teacher_view(i) for i in batch]
    return [floored(exact_log_probs(teacher, exact.trie, views, exact.branch_floor, exact.count)).flatten(0, 1)]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _write_shard(out_dir: Path, i: int, tensors: dict[str, torch.Tensor], first_row: int) -> None:
    rows = next(iter(tensors.values())).shape[0]
    meta = {"sha256": _checksum(tensors), "first_row": str(first_row), "rows": str(rows)}
    _write_file(_shard_path(out_dir, i), tensors, meta)


def _write_file(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Save tensors to a temp name, then rename: a cache file is always whole. Its mode follows the umask, as
    the manifest's does (the temp file is created private), so a shared teacher_cache.dir is readable by others."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except OSError as exc:  # disk full or quota: drop the partial temp file, keep the finished shards
        tmp.unlink(missing_ok=True)
        raise CacheError(f"{path}: cannot write it ({exc.strerror or exc}); free disk space, then rerun "
                         "(finished shards are kept)") from exc


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
    temperature: float = 1.0,
    vocab=None,
    branch_floor: float = 0.0,
    store: str = "topk",
) -> dict:
    """Write the top-k targets of the tempered teacher, softmax(logits / temperature) (`topk_targets`), for
    every token of dataset_dir/split into out_dir (resumable).

    temperature: the distillation temperature the cache will be read at (distill.kd.temperature; it is part
    of the key). shard_size: dataset rows per shard. overwrite=True replaces a cache built for other inputs
    or in another format (otherwise CacheError). vocab: the teachers.vocab.VocabMap of a dataset tokenized
    with a derived student vocabulary (required then, CacheError otherwise): the cache holds the top-k of the
    teacher's tempered exact distributions over the student's vocabulary (teachers.subvocab). branch_floor
    (with vocab only; ignored without it): skip the branch tokens whose relative ending mass is below it, which
    moves each such position's distribution by at most that mass in total variation (0: exact; part of the key).
    store: "topk" (the above) or "hidden": the teacher's last hidden states and its head instead
    (`build_hidden_cache`; k, temperature and branch_floor are then unused).
    Returns the stats of `build_shards`, with vocab plus "branches" (the build's BranchCount as a dict: over the
    shards written in this call). Raises CacheError for a branch_floor outside [0, 1) or an unknown store.
    """
    if store not in STORES:
        raise CacheError(f"teacher_cache.store={store!r}: use one of {'|'.join(STORES)}")
    if store == "hidden":
        return build_hidden_cache(teacher, dataset_dir, out_dir, batch_size, split, value_dtype, shard_size,
                                  progress, overwrite, vocab)
    ds = _open_split(dataset_dir, split)
    _check_inputs(teacher, ds, k, value_dtype, temperature, vocab, branch_floor)
    exact = None
    if vocab is not None:
        from teachers.subvocab import BranchCount, PieceTrie

        exact = _Exact(PieceTrie.from_vocab(vocab), float(branch_floor), BranchCount())
    key = cache_key(teacher, dataset_dir, split, k, value_dtype, temperature, branch_floor if vocab is not None else 0.0)

    def compute(rows: range) -> dict[str, torch.Tensor]:
        return _compute_rows(teacher, ds, rows, k, batch_size, _VALUE_DTYPES[value_dtype], token_chunk, temperature,
                             exact)

    stats = build_shards(out_dir, LOGITS, key, len(ds), int(shard_size), ds.seq_len, compute, overwrite=overwrite,
                         progress=progress, desc="teacher cache")
    if exact is not None:
        stats["branches"] = asdict(exact.count)
    return stats


def build_shards(out_dir: Path, fmt: ShardFormat, key: dict, n_rows: int, shard_rows: int, row_tokens: int,
                 compute: Callable[[range], dict[str, torch.Tensor]], overwrite: bool = False,
                 progress: bool = True, desc: str = "teacher cache") -> dict:
    """Write the shards of a cache of `fmt` under `key` into out_dir, resuming at the first missing one.

    compute(range of dataset rows) -> {tensor name: [rows, ...]} of those rows (fmt.shapes(key)); row_tokens:
    token positions per row (for the statistics). A manifest with another key raises CacheError unless
    overwrite. Marks the manifest complete and returns its stats: rows, tokens, shards, shards_written,
    seconds, tokens_per_s, bytes, bytes_per_token, bytes_per_row.
    """
    from tqdm.auto import tqdm

    out_dir = Path(out_dir)
    manifest = _open_for_build(out_dir, fmt, key, n_rows, shard_rows, overwrite)
    missing = [i for i in range(manifest["n_shards"]) if not _shard_path(out_dir, i).is_file()]
    t0, written_tokens = time.perf_counter(), 0
    done_rows = n_rows - sum(_rows_of(manifest, i)[1] - _rows_of(manifest, i)[0] for i in missing)
    bar = tqdm(total=n_rows * row_tokens, initial=done_rows * row_tokens, unit="tok", desc=desc,
               disable=not progress)
    for i in missing:
        lo, hi = _rows_of(manifest, i)
        tensors = compute(range(lo, hi))
        _check_computed(out_dir, fmt.shapes(key), tensors, hi - lo)
        _write_shard(out_dir, i, tensors, lo)
        written_tokens += (hi - lo) * row_tokens
        bar.update((hi - lo) * row_tokens)
    bar.close()
    seconds = time.perf_counter() - t0
    size = sum(_shard_path(out_dir, i).stat().st_size for i in range(manifest["n_shards"]))
    stats = {"rows": n_rows, "tokens": n_rows * row_tokens, "shards": manifest["n_shards"],
             "shards_written": len(missing), "seconds": seconds,
             "tokens_per_s": written_tokens / seconds if written_tokens else None,
             "bytes": size, "bytes_per_token": size / (n_rows * row_tokens), "bytes_per_row": size / n_rows}
    manifest.update(complete=True, stats=stats)
    _write_json(out_dir / _MANIFEST, manifest)
    return stats


def _check_computed(out_dir: Path, shapes: dict[str, tuple[int, ...]], tensors: dict[str, torch.Tensor],
                    rows: int) -> None:
    """The tensors computed for a shard are those its key describes (names and shapes), else CacheError."""
    have = {name: tuple(t.shape) for name, t in tensors.items()}
    want = {name: (rows, *shape) for name, shape in shapes.items()}
    if have != want:
        raise CacheError(f"{out_dir}: the computed targets {have} do not match the cache key's {want}; "
                         "nothing was written for them")


def _rows_of(manifest: dict, i: int) -> tuple[int, int]:
    lo = i * manifest["shard_rows"]
    return lo, min(lo + manifest["shard_rows"], manifest["n_rows"])


class ShardReader:
    """Reader of a finished cache of one ShardFormat: reader.row(i) -> {tensor name: tensor of dataset row i}.

    expect: key fields the cache must carry; any difference is a CacheError, and so is a cache of another
    format version, an unfinished one or a missing manifest. verify: check each shard's shapes and checksum
    the first time it is opened.
    """

    def __init__(self, out_dir: str | os.PathLike, fmt: ShardFormat, expect: dict | None = None,
                 verify: bool = True):
        self.dir, self.format = Path(out_dir), fmt
        manifest = _read_manifest(self.dir)
        if manifest is None:
            raise CacheError(f"{self.dir / _MANIFEST}: not found; build the cache first (teacher_cache stage)")
        _check_format(self.dir, manifest, fmt)
        if not manifest.get("complete"):
            raise CacheError(f"{self.dir}: cache is incomplete (a build was interrupted); rerun {fmt.builder} "
                             "(the teacher_cache stage) with the same inputs to resume it")
        diff = _key_diff(manifest["key"], expect or {})
        if diff:
            raise CacheError(f"{self.dir}: built for other inputs ({'; '.join(diff[:2])}); rebuild it "
                             "(teacher_cache stage) or delete the directory")
        self.manifest, self.key, self.verify = manifest, manifest["key"], verify
        self.shapes = fmt.shapes(self.key)
        # open shard handles, least recently used first; training reads rows in shuffled order, so one shard
        # at a time would reopen (and re-verify) a shard for almost every row
        self._open: OrderedDict[int, object] = OrderedDict()
        self._verified: set[int] = set()

    def __len__(self) -> int:
        return int(self.manifest["n_rows"])

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
            raise CacheError(f"{path}: missing or corrupt shard ({exc}); {REBUILD}") from exc
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
            tensors = {name: handle.get_tensor(name) for name in self.shapes}
        except (SafetensorError, RuntimeError) as exc:
            raise CacheError(f"{path}: corrupt shard ({exc}); delete it, then {REBUILD}") from exc
        shapes_ok = all(tuple(tensors[name].shape) == (rows, *shape) for name, shape in self.shapes.items())
        if not shapes_ok or (handle.metadata() or {}).get("sha256") != _checksum(tensors):
            raise CacheError(f"{path}: corrupt shard (shape or checksum mismatch); delete it, then {REBUILD}")

    def row(self, row: int) -> dict[str, torch.Tensor]:
        """{tensor name: its slice of dataset row `row`} as stored (dtype of the shard)."""
        if not 0 <= row < len(self):
            raise IndexError(f"row {row} out of range for a cache of {len(self)} rows")
        i = row // self.manifest["shard_rows"]
        r = row - i * self.manifest["shard_rows"]
        handle = self._shard(i)
        return {name: handle.get_slice(name)[r : r + 1][0] for name in self.shapes}


class TeacherCache(ShardReader):
    """Reader of a finished top-k logit cache: cache[i] -> SparseTargets [L, k] for dataset row i.

    expect: key fields the cache must carry (e.g. cache_key(...), which includes the temperature); any
    difference is a CacheError, and so is a cache of another format version.
    verify: check each shard's checksum the first time it is opened.
    """

    def __init__(self, out_dir: str | os.PathLike, expect: dict | None = None, verify: bool = True):
        super().__init__(out_dir, LOGITS, expect, verify)

    @property
    def k(self) -> int:
        return int(self.key["k"])

    @property
    def temperature(self) -> float:
        """The temperature tau its targets are of (softmax(logits / tau))."""
        return float(self.key["temperature"])

    def __getitem__(self, row: int) -> SparseTargets:
        t = self.row(row)
        return SparseTargets(t["ids"].long(), t["logprobs"].float(), t["tail_mass"].float())

    def batch(self, rows: list[int]) -> SparseTargets:
        """SparseTargets [B, L, k] for the given dataset rows."""
        return SparseTargets.stack([self[r] for r in rows])


# ------------------------------------------------------------------------------------------- the hidden store


class TeacherHead:
    """The teacher's LM head as the hidden store keeps it: logits = h W^T (+ b), then the final soft-cap
    c tanh(z / c) when the teacher has one (Gemma 2's final_logit_softcapping), as teachers.outputs.Teacher.head.

    weight: fp32 [V, C_t]; bias: fp32 [V] or None; softcap: c or None. Calling it on h [n, C_t] (any float
    dtype, any device) gives fp32 logits [n, V] without a graph; the weight is copied to h's device once.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, softcap: float | None = None):
        self.weight, self.bias, self.softcap = weight.float(), None if bias is None else bias.float(), softcap
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor | None]] = {}

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    def __call__(self, h: torch.Tensor) -> torch.Tensor:
        if h.device not in self._on:
            self._on[h.device] = (self.weight.to(h.device), None if self.bias is None else self.bias.to(h.device))
        w, b = self._on[h.device]
        with torch.no_grad():
            z = h.float() @ w.t()
            if b is not None:
                z = z + b
        return soft_cap(z, self.softcap)


@dataclass
class HiddenTargets:
    """Rows of a hidden store: hidden [..., L, C_t] (the teacher head's input at each position, as stored) and
    the shared TeacherHead that turns them into the teacher's full-vocabulary logits."""

    hidden: torch.Tensor
    head: TeacherHead

    @classmethod
    def stack(cls, items: list[HiddenTargets]) -> HiddenTargets:
        """Stack per-row targets [L, C_t] into a batch [B, L, C_t] (one head, shared)."""
        return cls(torch.stack([t.hidden for t in items]), items[0].head)

    def to(self, device: str | torch.device) -> HiddenTargets:
        return HiddenTargets(self.hidden.to(device), self.head)


def _teacher_head(teacher) -> TeacherHead:
    """The teacher's output embedding as a TeacherHead (fp32 copies; the soft-cap from its config)."""
    module = teacher.model.get_output_embeddings()
    bias = getattr(module, "bias", None)
    return TeacherHead(module.weight.detach().float().cpu().clone(),
                       None if bias is None else bias.detach().float().cpu().clone(),
                       getattr(teacher.config, "final_logit_softcapping", None) or None)


def _head_tensors(head: TeacherHead) -> dict[str, torch.Tensor]:
    return {"weight": head.weight.contiguous(), **({} if head.bias is None else {"bias": head.bias.contiguous()})}


def hidden_cache_key(teacher, dataset_dir: str | os.PathLike, split: str, value_dtype: str,
                     head: TeacherHead | None = None) -> dict:
    """The manifest key of a hidden store of `teacher` over dataset_dir/split (pass as HiddenCache expect);
    head: the teacher's TeacherHead when the caller has it already."""
    head = head or _teacher_head(teacher)
    key = cache_key(teacher, dataset_dir, split, 1, value_dtype)
    for name in ("k", "temperature"):
        del key[name]
    key.update(format=HIDDEN_FORMAT, width=teacher.hidden_size, vocab_size=head.vocab_size,
               head_sha256=_checksum(_head_tensors(head)), softcap=head.softcap)
    return key


def _hidden_shapes(key: dict) -> dict[str, tuple[int, ...]]:
    return {"hidden": (int(key["seq_len"]), int(key["width"]))}


HIDDEN = ShardFormat(HIDDEN_FORMAT, "the teacher's last hidden states and its LM head", "build_teacher_cache",
                     _hidden_shapes)


def build_hidden_cache(teacher, dataset_dir: str | os.PathLike, out_dir: str | os.PathLike, batch_size: int = 8,
                       split: str = "train", value_dtype: str = "bf16", shard_size: int = 256,
                       progress: bool = True, overwrite: bool = False, vocab=None) -> dict:
    """Write the teacher's last hidden states of every token of dataset_dir/split, and its LM head, into
    out_dir (resumable; the hidden store of the module docstring; a missing or damaged head is rewritten).
    Returns `build_shards`' stats (their "bytes" and per-token figures: the shards) plus "head_bytes", the
    head file's size (fp32 whatever value_dtype: 113 MB for SmolLM2-135M). Raises CacheError for a dataset
    tokenized with a derived student vocabulary (vocab given, or the dataset's meta says so), an unknown
    value_dtype or another key in out_dir."""
    ds = _open_split(dataset_dir, split)
    if vocab is not None or ds.meta.get("vocab", "teacher") != "teacher":
        raise CacheError(f"{ds.dir}: teacher_cache.store=hidden needs student.vocab=teacher (exact targets over "
                         "a derived vocabulary mix several teacher positions); use teacher_cache.store=topk")
    _check_data(teacher, ds, value_dtype, None)
    head = _teacher_head(teacher)
    key = hidden_cache_key(teacher, dataset_dir, split, value_dtype, head)
    out = Path(out_dir)
    # the head first, so a cache with shards always has its head; its checksum is in the key
    _open_for_build(out, HIDDEN, key, len(ds), int(shard_size), overwrite)
    head_path = out / _HEAD_FILE
    if not _head_matches(head_path, key["head_sha256"]):  # missing, damaged or another teacher's: (re)write it
        _write_file(head_path, _head_tensors(head), {"sha256": key["head_sha256"]})
    dtype = _VALUE_DTYPES[value_dtype]

    def compute(rows: range) -> dict[str, torch.Tensor]:
        parts = []
        for start in range(rows.start, rows.stop, batch_size):
            batch = torch.stack([ds[i] for i in range(start, min(start + batch_size, rows.stop))])
            h = teacher(batch, logits=False, hidden_states=False).last_hidden_state
            parts.append(h.to("cpu", dtype))
        return {"hidden": torch.cat(parts)}

    stats = build_shards(out, HIDDEN, key, len(ds), int(shard_size), ds.seq_len, compute, overwrite=overwrite,
                         progress=progress, desc="teacher cache (hidden)")
    stats["head_bytes"] = head_path.stat().st_size  # beside the shards' "bytes", once whatever the rows
    return stats


def _head_matches(path: Path, sha256: str) -> bool:
    try:
        return path.is_file() and _checksum(_read_head_tensors(path)) == sha256
    except CacheError:
        return False


def _read_head_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except (OSError, SafetensorError) as exc:
        raise CacheError(f"{path}: missing or corrupt teacher head ({exc}); {REBUILD}") from exc


class HiddenCache(ShardReader):
    """Reader of a finished hidden store: cache[i] -> HiddenTargets ([L, C_t] of dataset row i, the head).

    expect: key fields the cache must carry (hidden_cache_key(...)); any difference is a CacheError, and so is
    a cache of another format (a top-k cache), or a head whose checksum differs from the key's.
    """

    def __init__(self, out_dir: str | os.PathLike, expect: dict | None = None, verify: bool = True):
        super().__init__(out_dir, HIDDEN, expect, verify)
        tensors = _read_head_tensors(self.dir / _HEAD_FILE)
        if _checksum(tensors) != self.key["head_sha256"]:
            raise CacheError(f"{self.dir / _HEAD_FILE}: its checksum differs from the manifest's head_sha256 "
                             f"(corrupt or from another teacher); {REBUILD}")
        self.head = TeacherHead(tensors["weight"], tensors.get("bias"), self.key.get("softcap"))

    def __getitem__(self, row: int) -> HiddenTargets:
        return HiddenTargets(self.row(row)["hidden"], self.head)

    def batch(self, rows: list[int]) -> HiddenTargets:
        """HiddenTargets [B, L, C_t] for the given dataset rows."""
        return HiddenTargets.stack([self[r] for r in rows])


def nominal_bytes_per_token(k: int, value_dtype: str = "bf16") -> int:
    """k int32 ids + k values + one fp32 tail per token (shard headers excluded)."""
    return k * (4 + _VALUE_DTYPES[value_dtype].itemsize) + 4


__all__ = ["HIDDEN", "LOGITS", "STORES", "SUBVOCAB_TARGETS", "CacheError", "HiddenCache", "HiddenTargets", "ShardFormat",
           "ShardReader", "SparseTargets", "TeacherCache", "TeacherHead", "build_hidden_cache", "build_shards",
           "build_teacher_cache", "cache_key", "hidden_cache_key", "nominal_bytes_per_token",
           "topk_targets", "vocab_key"]
