"""The teacher's SpAD targets of every training row, stored once so that distillation never runs the teacher.

The SpAD feature terms (BiSpikCLM, arXiv 2605.13859) compare the student with the teacher's input embeddings
(EA), the states of the teacher layers mapped onto the student's (SFA) and their attention maps (SAA). None of
them depends on the student, so for a fixed dataset they can be computed once, like the top-k logits of
teachers.cache, whose shard machinery (manifest, key check, resumable build, checksums) this module uses.

Format (directory; pipeline's teacher_cache stage puts it in <teacher cache dir>/features):
  manifest.json   its key: format FORMAT, teacher fingerprint and dtype, tokenizer and data hashes, split, seq_len,
                  value dtype, the teacher's width, and what the targets depend on (`targets_key`, given by the
                  caller, pipeline.losses.SpADTargetSpec.key): "terms" (the weighted ones among ea, saa, sfa),
                  "layer_map" (teacher layer of each student layer; with saa or sfa), "head_mapping" and
                  "heads" (the head count of the stored maps; with saa), "sfa_target_norm" (with sfa).
  shard_*.safetensors   rows [r0, r0 + shard_rows), the tensors of the weighted terms only, in the value dtype:
                  embeddings  [rows, L, C]             EA: the input of decoder layer 0 of each token
                  features    [rows, n, L, C]          SFA: each mapped layer's state as SFA compares it
                  maps        [rows, n, H, L (L + 1) / 2]   SAA: each mapped layer's map, causal lower triangle
                  (n = len(layer_map), C = width, H = heads). A map is stored as the loss reads it before any
                  learned head mix: mapped onto the student's heads for head_mapping "mean", the teacher's own
                  heads for "learned". Entries above the diagonal of a causal map are exactly 0 and are not
                  stored (a teacher whose maps are not causal is refused at build time); the reader puts the
                  zeros back.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path

import torch

from teachers.cache import (
    _VALUE_DTYPES,
    ShardFormat,
    ShardReader,
    _check_tokenizer,
    _open_split,
    build_shards,
)
from teachers.data import TokenDataset
from teachers.errors import CacheError

FORMAT = "spad-targets/1"
FEATURE_TERMS = ("ea", "saa", "sfa")
SHARD_ROWS = 32  # ~1 MB per row of the study's targets in bf16: 32 MB shards


def _shapes(key: dict) -> dict[str, tuple[int, ...]]:
    """Per-row shapes of the tensors a shard holds under `key`."""
    length, width, terms = int(key["seq_len"]), int(key["width"]), key["terms"]
    shapes = {}
    if "ea" in terms:
        shapes["embeddings"] = (length, width)
    if "sfa" in terms:
        shapes["features"] = (len(key["layer_map"]), length, width)
    if "saa" in terms:
        shapes["maps"] = (len(key["layer_map"]), int(key["heads"]), length * (length + 1) // 2)
    return shapes


FEATURES = ShardFormat(FORMAT, "the teacher's SpAD targets", "build_feature_cache", _shapes)


def feature_cache_key(teacher, dataset_dir: str | os.PathLike, split: str, value_dtype: str,
                      targets_key: dict) -> dict:
    """The manifest key of a feature cache of `teacher` over dataset_dir/split (pass as FeatureCache expect).
    targets_key: what the stored targets depend on (see the module docstring)."""
    meta = TokenDataset(dataset_dir, split).meta
    return {"format": FORMAT, "teacher_fingerprint": teacher.fingerprint,
            "teacher_dtype": str(teacher.dtype).removeprefix("torch."), "tokenizer_hash": meta["tokenizer_hash"],
            "data_hash": meta["split_hashes"][split], "split": split, "seq_len": int(meta["seq_len"]),
            "value_dtype": value_dtype, "width": teacher.hidden_size, **targets_key}


def nominal_bytes_per_row(key: dict) -> int:
    """Bytes of one row's stored targets under `key` (shard headers excluded)."""
    itemsize = _VALUE_DTYPES[key["value_dtype"]].itemsize
    return sum(math.prod(shape) for shape in _shapes(key).values()) * itemsize


def _check_inputs(teacher, ds: TokenDataset, value_dtype: str, targets_key: dict) -> None:
    if value_dtype not in _VALUE_DTYPES:
        raise CacheError(f"teacher_cache.value_dtype={value_dtype!r}: use one of {sorted(_VALUE_DTYPES)}")
    terms = targets_key.get("terms") or []
    if not terms or not set(terms) <= set(FEATURE_TERMS):
        raise CacheError(f"feature cache terms {terms!r}: give a non-empty subset of {FEATURE_TERMS}")
    if ds.meta.get("vocab", "teacher") != "teacher":
        raise CacheError(f"{ds.dir}: tokenized with student.vocab={ds.meta['vocab']}; SpAD targets compare "
                         "positions, so they exist only for the teacher's own vocabulary")
    _check_tokenizer(teacher, ds, None)
    if "saa" in terms and not teacher.attn_maps:
        raise CacheError(f"{teacher.spec}: loaded without attention maps; the saa targets need "
                         "load_teacher(..., attn_maps=True)")
    if len(ds) == 0:
        raise CacheError(f"{ds.dir}: split {ds.split!r} has no rows; nothing to cache")


def _lower_triangle(maps: torch.Tensor) -> torch.Tensor:
    """Causal maps [..., L, L] -> their lower triangles [..., L (L + 1) / 2] (row-major: query i, keys 0..i).
    Raises CacheError when an entry above the diagonal is not exactly 0."""
    length = maps.shape[-1]
    if bool(maps.triu(1).ne(0).any()):
        raise CacheError("the teacher's attention maps are not causal (non-zero above the diagonal); the feature "
                         "cache stores causal maps only: set teacher_cache.features=false")
    rows, cols = torch.tril_indices(length, length, device=maps.device)
    return maps[..., rows, cols]


def _full_square(packed: torch.Tensor, length: int) -> torch.Tensor:
    """Lower triangles [..., L (L + 1) / 2] -> maps [..., L, L] (fp32), zeros above the diagonal."""
    rows, cols = torch.tril_indices(length, length)
    maps = packed.new_zeros(*packed.shape[:-1], length, length, dtype=torch.float32)
    maps[..., rows, cols] = packed.float()
    return maps


def _compute_rows(teacher, ds: TokenDataset, rows: range, targets: Callable, terms: list[str], batch_size: int,
                  value_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The stored tensors of dataset rows (see the module docstring), batch by batch through the teacher."""
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(rows.start, rows.stop, batch_size):
        ids = torch.stack([ds[i] for i in range(start, min(start + batch_size, rows.stop))])
        out = teacher(ids, logits=False, hidden_states="sfa" in terms)
        for name, value in targets(out).items():
            value = _lower_triangle(value) if name == "maps" else value
            parts.setdefault(name, []).append(value.to("cpu", value_dtype))
    return {name: torch.cat(values) for name, values in parts.items()}


def build_feature_cache(
    teacher,
    dataset_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    targets: Callable[[object], dict[str, torch.Tensor]],
    targets_key: dict,
    batch_size: int = 8,
    split: str = "train",
    value_dtype: str = "bf16",
    shard_size: int | None = None,
    progress: bool = True,
    overwrite: bool = False,
) -> dict:
    """Write the teacher's SpAD targets of every row of dataset_dir/split into out_dir (resumable).

    targets(teacher output of a batch [B, L]) -> {"embeddings": [B, L, C], "features": [B, n, L, C], "maps":
    [B, n, H, L, L]} for the terms of targets_key["terms"] (pipeline.losses.SpADTargetSpec.extract(...).tensors()),
    stored as the module docstring says; targets_key: what they depend on (it enters the key). The teacher
    must be loaded with attn_maps=True when "saa" is a term. shard_size: rows per shard (None: SHARD_ROWS);
    overwrite=True replaces a cache built for other inputs (otherwise CacheError). Raises CacheError for bad
    inputs (value dtype, terms, a dataset of another tokenizer or of a derived vocabulary, non-causal maps).
    Returns the stats of teachers.cache.build_shards.
    """
    ds = _open_split(dataset_dir, split)
    _check_inputs(teacher, ds, value_dtype, targets_key)
    key = feature_cache_key(teacher, dataset_dir, split, value_dtype, targets_key)

    def compute(rows: range) -> dict[str, torch.Tensor]:
        return _compute_rows(teacher, ds, rows, targets, list(targets_key["terms"]), batch_size,
                             _VALUE_DTYPES[value_dtype])

    return build_shards(Path(out_dir), FEATURES, key, len(ds), int(shard_size or SHARD_ROWS), ds.seq_len, compute,
                        overwrite=overwrite, progress=progress, desc="teacher SpAD targets")


class FeatureCache(ShardReader):
    """Reader of a finished feature cache: cache[i] -> {"embeddings": [L, C], "features": [n, L, C], "maps":
    [n, H, L, L]} (fp32, the weighted terms' tensors only) of dataset row i.

    expect: key fields the cache must carry (feature_cache_key(...)); any difference is a CacheError, and so
    is a cache of another format, an unfinished one or a shard whose shapes or checksum are wrong.
    """

    def __init__(self, out_dir: str | os.PathLike, expect: dict | None = None, verify: bool = True):
        super().__init__(out_dir, FEATURES, expect, verify)

    def __getitem__(self, row: int) -> dict[str, torch.Tensor]:
        stored = self.row(row)
        length = int(self.key["seq_len"])
        return {name: _full_square(value, length) if name == "maps" else value.float()
                for name, value in stored.items()}

    def batch(self, rows: list[int]) -> dict[str, torch.Tensor]:
        """The tensors of the given dataset rows, stacked: [B, ...]."""
        items = [self[r] for r in rows]
        return {name: torch.stack([item[name] for item in items]) for name in items[0]}


__all__ = ["FEATURES", "FEATURE_TERMS", "FORMAT", "FeatureCache", "build_feature_cache", "feature_cache_key",
           "nominal_bytes_per_row"]
