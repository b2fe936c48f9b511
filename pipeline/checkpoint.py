"""Atomic, verifiable training checkpoints: checkpoints/step-XXXXXXX/ inside a stage folder.

A checkpoint is written into checkpoints/.tmp-step-XXXXXXX/ and renamed only once every file is on disk
and manifest.json (size and sha256 of each file) has been written last; so a folder named step-* is
complete, and a half-written one is never picked up. Loading re-checks the manifest and falls back to the
previous checkpoint when the newest one is truncated or corrupt. Only the last `keep` are kept.

Files: model.safetensors (the trainable module's full state dict), optimizer.pt (full optimizer state,
replicated) or optimizer-rank{R}.pt (one shard per rank), trainer.json (step, data position, counters),
scheduler.pt, rng-rank{R}.pt (python, numpy, torch and CUDA RNG states of each rank). Everything but the
weights is written with torch.save of plain containers and tensors and read back with weights_only=True.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from pipeline.errors import StageError

PREFIX = "step-"
TMP_PREFIX = ".tmp-" + PREFIX
MANIFEST = "manifest.json"
log = logging.getLogger(__name__)


class CheckpointError(StageError):
    """A checkpoint cannot be written or read (names the folder and what to do)."""


@dataclass
class Checkpoint:
    """One verified checkpoint folder, read lazily."""

    path: Path
    step: int
    trainer_state: dict = field(default_factory=dict)

    def model_state(self) -> dict[str, torch.Tensor]:
        return load_file(self.path / "model.safetensors")

    def optimizer_state(self, rank: int) -> dict | None:
        for name in ("optimizer.pt", f"optimizer-rank{rank}.pt"):
            if (self.path / name).is_file():
                return _load_torch(self.path / name)
        return None

    def scheduler_state(self) -> dict | None:
        f = self.path / "scheduler.pt"
        return _load_torch(f) if f.is_file() else None

    def rng_state(self, rank: int) -> dict | None:
        f = self.path / f"rng-rank{rank}.pt"
        return _load_torch(f) if f.is_file() else None


def _load_torch(path: Path) -> Any:
    """torch.load(weights_only=True); a file it refuses (a pickle of arbitrary objects) is a CheckpointError."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).split("WeightsUnpickler error: ")[-1].splitlines()[0]
        raise CheckpointError(f"{path}: refused by torch.load(weights_only=True) ({reason}); this checkpoint "
                              f"holds more than tensors and plain containers, delete {path.parent}") from None


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:07d}"


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    """All RNG states of this process as plain containers and tensors (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what rng_state() returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_manifest(folder: Path) -> None:
    files = {p.name: {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    tmp = folder / (MANIFEST + ".part")
    tmp.write_text(json.dumps({"files": files}, indent=1))
    _fsync_file(tmp)
    os.replace(tmp, folder / MANIFEST)


def verify(folder: Path) -> str | None:
    """None when the folder matches its manifest, else a one-line reason."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError):
        return "missing or unreadable manifest.json"
    for name, meta in files.items():
        f = folder / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != meta["bytes"]:
            return f"{name} has {f.stat().st_size} bytes, expected {meta['bytes']} (truncated)"
        if _sha256(f) != meta["sha256"]:
            return f"{name} fails its sha256 check (corrupt)"
    return None


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every step-* folder under root, oldest first (not verified)."""
    out = []
    if root.is_dir():
        for p in root.iterdir():
            if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit():
                out.append((int(p.name[len(PREFIX):]), p))
    return sorted(out)


def load_latest(root: Path) -> Checkpoint | None:
    """The newest checkpoint under root that passes verification; corrupt ones are reported and skipped."""
    for step, folder in reversed(list_checkpoints(root)):
        problem = verify(folder)
        if problem is not None:
            log.warning("checkpoint %s skipped: %s; falling back to the previous one", folder, problem)
            continue
        state = json.loads((folder / "trainer.json").read_text())
        return Checkpoint(path=folder, step=step, trainer_state=state)
    return None


def _save_torch(obj: Any, path: Path) -> None:
    torch.save(obj, path)
    _fsync_file(path)


@dataclass
class CheckpointPayload:
    """What one rank contributes to a checkpoint; the main-process-only fields are None on other ranks."""

    trainer_state: dict
    rng: dict
    model_state: dict[str, torch.Tensor] | None = None
    optimizer_state: dict | None = None
    optimizer_sharded: bool = False
    scheduler_state: dict | None = None


def save_checkpoint(root: Path, step: int, payload: CheckpointPayload, *, rank: int = 0, keep: int = 2,
                    barrier: Callable[[], None] = lambda: None) -> Path:
    """Write checkpoint `step` atomically; every rank calls it (collective through `barrier`)."""
    final = root / step_dir_name(step)
    tmp = root / (TMP_PREFIX + f"{step:07d}")
    try:
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        barrier()
        _save_torch(payload.rng, tmp / f"rng-rank{rank}.pt")
        if payload.optimizer_sharded and payload.optimizer_state is not None:
            _save_torch(payload.optimizer_state, tmp / f"optimizer-rank{rank}.pt")
        if rank == 0:
            _write_main_files(tmp, payload)
        barrier()
        if rank == 0:
            _write_manifest(tmp)
            _publish(tmp, final)
            prune(root, keep)
    except OSError as exc:
        raise CheckpointError(f"{tmp}: cannot write checkpoint ({exc.strerror or exc}); free disk space or "
                              "fix the run directory permissions") from exc
    barrier()
    return final


def _write_main_files(tmp: Path, payload: CheckpointPayload) -> None:
    if payload.model_state is not None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in payload.model_state.items()}
        save_file(tensors, tmp / "model.safetensors")
        _fsync_file(tmp / "model.safetensors")
    if payload.optimizer_state is not None and not payload.optimizer_sharded:
        _save_torch(payload.optimizer_state, tmp / "optimizer.pt")
    if payload.scheduler_state is not None:
        _save_torch(payload.scheduler_state, tmp / "scheduler.pt")
    (tmp / "trainer.json").write_text(json.dumps(payload.trainer_state, indent=1))
    _fsync_file(tmp / "trainer.json")


def _publish(tmp: Path, final: Path) -> None:
    """Rename tmp onto final; an existing final (a rerun of the same step) is moved aside first."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(final.parent)


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest `keep` checkpoints, and stale temp folders."""
    for _, folder in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(folder, ignore_errors=True)
    for p in root.iterdir():
        if p.name.startswith(TMP_PREFIX):
            shutil.rmtree(p, ignore_errors=True)


def clear(root: Path) -> None:
    """Remove every checkpoint under root (used when the stage's config changed)."""
    shutil.rmtree(root, ignore_errors=True)
