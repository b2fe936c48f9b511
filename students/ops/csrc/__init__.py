"""Build-once loader for the fused CPU kernels in spike_ops.cpp, fused_ops.cpp, sparse_ops.cpp and decode_ops.cpp
(plain C ABI, called through ctypes; all are linked into one library).

The library has no torch headers, so g++ builds it without torch's build machinery (tens of seconds of CPU
once: students/ops/README.md, "The CPU library"). It is cached per source hash (lif_charge.h included) and CPU
model under $SPIKEDISTILL_CACHE/cpu_kernels (default ~/.cache/spikedistill/cpu_kernels); a file lock keeps
parallel processes from building it twice. When the build fails the ops fall back to the reference once,
with a warning.
"""
import ctypes
import fcntl
import hashlib
import os
import platform
import subprocess
import tempfile
import warnings
from functools import cache
from pathlib import Path

import torch

from ..threads import tick

SOURCES = [
    Path(__file__).with_name(name) for name in ("spike_ops.cpp", "fused_ops.cpp", "sparse_ops.cpp", "decode_ops.cpp")
]
HEADERS = [Path(__file__).with_name("lif_charge.h")]  # included by the sources: part of the cache key
# Compiled with -ffast-math but linked without it: a -ffast-math link adds crtfastmath.o, whose constructor
# would switch the whole process to flush-denormals-to-zero and silently change torch's own numerics.
COMPILE_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-std=c++17"]
LINK_FLAGS = ["-shared", "-fopenmp"]

_P, _I64, _F, _I, _D = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_double
_CHARGE = [_I, _D, _D]  # lif_charge.h: ChargeKind, 1/tau, 1 - 1/tau (lif.reference.charge_constants)
_SIGNATURES = {
    "lif_forward": [_P] * 4 + [_I64] * 3 + _CHARGE + [_F, _I, _I],
    "lif_backward": [_P] * 6 + [_I64] * 3 + _CHARGE + [_F, _I, _I, _I, _F, _I],
    "wkv_forward": [_P] * 11 + [_I64] * 3 + [_I],
    "wkv_backward": [_P] * 18 + [_I64] * 3 + [_I],
    "sfsa_threshold": [_P] * 2 + [_I64] * 4 + [_I],
    "sfsa_threshold_backward": [_P] * 4 + [_I64] * 4 + [_I, _F, _I],
    "kd_dense_rows": [_P] * 3 + [_I64] * 2 + [_I] + [_F] * 4 + [_I, _P, _P, _I],
    "kd_sparse_rows": [_P] * 5 + [_I64] * 3 + [_I] + [_F] * 4 + [_I, _P, _P, _I],
    # fused_ops.cpp: students/ops/linear_ce and students/ops/fused_lif
    "pack_tiles": [_P, _I64, _I64, _P, _I64, _I],
    "unpack_tiles": [_P, _I64, _I64, _P, _I64, _I],
    "spike_logits": [_P, _I64, _P, _P, _P, _I64, _I64, _I64, _I],
    "spike_weight_grad": [_P, _I64, _I64, _P, _P, _P, _I64, _I64, _I, _I],
    "ce_rows": [_P, _I64, _P, _I64, _I64, _F, _I, _P, _I],
    "pointwise_lif_forward": [_I] + [_P] * 5 + [_I64] * 3 + _CHARGE + [_F] + [_I] * 3,
    "pointwise_lif_backward": [_I] + [_P] * 8 + [_I64] * 3 + _CHARGE + [_F] + [_I] * 3 + [_F, _I, _I],
    "shift_lif_forward": [_P] * 6 + [_I64] * 5 + _CHARGE + [_F] + [_I] * 3,
    "shift_lif_backward": [_P] * 10 + [_I64] * 5 + _CHARGE + [_F] + [_I] * 3 + [_F, _I, _I],
}
_RETURNS = {  # functions that return a value: (restype, argtypes)
    "spike_tile": (_I64, []),
    "event_linear": (_I, [_P] * 5 + [_I64] * 3 + [_I, _I, _D, _I]),
    "decode_step": (_I, [_P, _P, _I64, _P, _P, _D, _I]),
}


def cache_root() -> Path:
    """$SPIKEDISTILL_CACHE, default ~/.cache/spikedistill."""
    return Path(os.environ.get("SPIKEDISTILL_CACHE") or os.path.join(Path.home(), ".cache", "spikedistill"))


def cache_dir() -> Path:
    """Where built libraries live: $SPIKEDISTILL_CACHE/cpu_kernels or ~/.cache/spikedistill/cpu_kernels."""
    return cache_root() / "cpu_kernels"


def _cpu_model() -> str:
    # -march=native code must not be reused on a different CPU sharing the cache directory
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one builder at a time; the others find the finished file
        if target.exists():
            return
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
        os.close(fd)
        objs = [f"{tmp[:-3]}_{i}.o" for i in range(len(SOURCES))]
        cxx = os.environ.get("CXX", "g++")
        try:
            compiles = [[cxx, *COMPILE_FLAGS, "-c", str(src), "-o", obj] for src, obj in zip(SOURCES, objs)]
            for cmd in [*compiles, [cxx, *LINK_FLAGS, *objs, "-o", tmp]]:
                subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=300)
            os.replace(tmp, target)
        finally:
            for path in (tmp, *objs):
                if os.path.exists(path):
                    os.unlink(path)


@cache
def library_key() -> str:
    """The library's cache key: a hash of its sources, headers, compiler flags and the CPU model."""
    flags = " ".join(COMPILE_FLAGS + LINK_FLAGS)
    sources = b"".join(src.read_bytes() for src in SOURCES + HEADERS)
    return hashlib.sha256(sources + flags.encode() + _cpu_model().encode()).hexdigest()[:16]


@cache
def library() -> ctypes.CDLL | None:
    """The loaded kernel library, building it on first use; None (after one warning) if it cannot be built."""
    target = cache_dir() / f"spike_ops_{platform.machine()}_{library_key()}.so"
    try:
        if not target.exists():
            _build(target)
        lib = ctypes.CDLL(str(target))
    except (OSError, subprocess.SubprocessError) as exc:
        detail = getattr(exc, "stderr", "") or exc
        warnings.warn(
            f"students/ops/csrc: could not build {', '.join(src.name for src in SOURCES)} "
            f"({str(detail).strip()[:200]}); the spike ops fall "
            "back to the slow reference. Install g++ with OpenMP or set SPIKEDISTILL_KERNELS=reference.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    for name, argtypes in _SIGNATURES.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, None
    for name, (restype, argtypes) in _RETURNS.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    return lib


def ptr(t: torch.Tensor | None) -> int | None:
    """Data pointer of a contiguous fp32 tensor (None passes a null pointer)."""
    if t is None:
        return None
    assert t.dtype == torch.float32 and t.is_contiguous(), "kernel buffers must be contiguous fp32"
    return t.data_ptr()


def threads() -> int:
    """OpenMP threads per call: torch's intra-op thread count, so torch.set_num_threads governs both; first lets
    the thread governor re-decide that count when one is on (students/ops/threads.py)."""
    tick()
    return torch.get_num_threads()
