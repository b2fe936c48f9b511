"""Where the event path beats the dense matmul on this CPU: the firing rate up to which it wins, by rows.

The dense GEMM reuses each weight it loads across rows and the gather-add cannot, so the crossover rate falls as
rows grow; where it lies depends on the CPU (SIMD width, caches, memory bandwidth), the BLAS and the thread
count. So it is measured, once per CPU model (model name and flags of /proc/cpuinfo), kernel library (its source
hash), torch version and thread count, in a fraction of a second on first use, and cached as JSON under
$SPIKEDISTILL_CACHE/event_crossover (default ~/.cache/spikedistill); a file lock keeps parallel processes from
measuring at once.

Measurement (`measure_crossover`): for each layer size of SIZES and each row count of ROWS, rates ascending
(RATES), REPEATS pairs of one dense (torch's matmul) and one event call (`event_linear_cpu`, its Python
overhead included, as `event_linear` pays it), interleaved with the order alternating, on fresh spike patterns,
after one warm-up pair. Timed with the calling thread's CPU time at 1 thread (time spent descheduled by other
jobs does not count) and wall time otherwise. A rate is won when the median of the pairs' event/dense ratios is
below WIN; the crossover of a row count is the last rate won before the first one lost. More rows never get a
higher rate than fewer (the table is made monotone), and a row count lost at the lowest rate ends the table:
dense beyond it, and beyond the largest row count measured (ROWS, capped at MAX_WORK multiply-adds per call).

At more than one thread a measurement taken while other processes kept this process's CPUs busy (at least
CONTENDED cores' worth, from /proc/stat: threads.py) is used by this process but not cached: an OpenMP call that
waits for a descheduled thread measures the load, not the CPU (on the 2-core machine at a load average of 7, a
one-row gather-add over a 128 x 8192 layer on two threads took 26-50 ms of wall time; 0.04-0.17 ms of CPU time
when both threads ran).

Fallback (no kernel library, or timings that are not finite and positive): FALLBACK, the event path only at
one row of a large layer (>= LARGE_WEIGHTS, beyond the L2 cache of x86 CPUs, so the dense matvec streams it
from memory) up to a rate of 0.5, where it reads at most half the bytes the matvec reads. It is not cached: the
next process measures again.
"""
from __future__ import annotations

import fcntl
import hashlib
import itertools
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from ..csrc import cache_root, library, library_key
from ..threads import ThreadGovernor

Table = tuple[tuple[int, float], ...]  # (up to this many rows, take the event path up to this firing rate)
TimePair = Callable[[int, float], tuple[float, float]]  # (rows, rate) -> (dense seconds, event seconds)

ROWS = (1, 4, 16, 64, 256)
RATES = (0.1, 0.2, 0.3, 0.5, 0.7, 0.9)
LARGE_WEIGHTS = 1 << 20  # in * out from which a layer uses the "large" table
SIZES = {"small": (256, 512), "large": (128, 8192)}  # (in, out): 2^17 weights (MIN_WEIGHTS), 2^20
REPEATS = 5
WIN = 0.9  # event / dense below this (median of the pairs) wins: noise alone does not tip a rate to the event path
MAX_WORK = 1 << 26  # rows * in * out above this is not measured (a few ms per dense call)
FALLBACK = {"small": (), "large": ((1, 0.5),)}
CONTENDED = 0.5  # cores' worth of other processes' use of our CPUs above which a multi-thread measurement is not kept


class CalibrationError(RuntimeError):
    """The timings could not be used (not finite and positive)."""


def measure_crossover(time_pair: TimePair, n_weights: int, rows: tuple[int, ...] = ROWS,
                      rates: tuple[float, ...] = RATES, repeats: int = REPEATS) -> Table:
    """The crossover table of one layer size from timed pairs: see the module docstring.

    time_pair(rows, rate) -> (dense seconds, event seconds) of one interleaved pair; n_weights = in * out of
    the layer it times (for MAX_WORK). Raises CalibrationError when a timing is not finite and positive.
    """
    table, ceiling = [], max(rates)
    for r in rows:
        if r * n_weights > MAX_WORK:
            break
        won = 0.0
        for rate in (x for x in rates if x <= ceiling):
            time_pair(r, rate)  # warm-up
            pairs = [time_pair(r, rate) for _ in range(repeats)]
            if not all(0.0 < t < float("inf") for pair in pairs for t in pair):
                raise CalibrationError(f"unusable timings {pairs} at {r} rows, rate {rate}")
            if statistics.median(event / dense for dense, event in pairs) >= WIN:
                break
            won = rate
        if won == 0.0:
            break
        table.append((r, won))
        ceiling = won
    return tuple(table)


def pair_timer(n_in: int, n_out: int, timer: Callable[[], float], seed: int = 0) -> TimePair:
    """time_pair for a random fp32 layer [n_out, n_in]: one dense and one event call on a fresh spike pattern
    (one of three per (rows, rate), in turn), in alternating order."""
    from .cpu import event_linear_cpu
    from .reference import event_linear_reference

    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n_out, n_in, generator=gen)
    weight_t = weight.t().contiguous()
    patterns: dict[tuple[int, float], itertools.cycle] = {}
    dense_first = itertools.cycle((True, False))

    def time_pair(rows: int, rate: float) -> tuple[float, float]:
        if (rows, rate) not in patterns:
            spikes = [(torch.rand(rows, n_in, generator=gen) < rate).float() for _ in range(3)]
            patterns[rows, rate] = itertools.cycle(spikes)
        x = next(patterns[rows, rate])
        calls = (lambda: event_linear_reference(x, weight), lambda: event_linear_cpu(x, weight_t))
        order = (0, 1) if next(dense_first) else (1, 0)
        took = [0.0, 0.0]
        for i in order:
            start = timer()
            calls[i]()
            took[i] = timer() - start
        return took[0], took[1]

    return time_pair


def calibrate(threads: int, timer: Callable[[], float] | None = None) -> dict[str, Table]:
    """The crossover tables {"small", "large"} measured now at `threads` threads (torch's count is set for the
    measurement and restored). timer: default the thread's CPU time at 1 thread, wall time otherwise."""
    if timer is None:
        timer = time.thread_time if threads == 1 else time.perf_counter
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            return {size: measure_crossover(pair_timer(n_in, n_out, timer), n_in * n_out)
                    for size, (n_in, n_out) in SIZES.items()}
    finally:
        torch.set_num_threads(before)


def cpu_signature() -> str:
    """The CPU's model name and flags (/proc/cpuinfo), or what `platform` knows when that is unreadable."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    model = next((line for line in lines if line.startswith("model name")), platform.processor())
    flags = next((line for line in lines if line.startswith("flags")), platform.machine())
    return f"{model}\n{flags}"


def cache_file() -> Path:
    """The JSON file of this CPU, kernel library and torch version (all thread counts in it)."""
    key = hashlib.sha256(f"{cpu_signature()}\n{library_key()}\n{torch.__version__}".encode()).hexdigest()[:16]
    return cache_root() / "event_crossover" / f"{key}.json"


def _read(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) and isinstance(data.get("threads"), dict) else {}


def _parse(entry) -> dict[str, Table] | None:
    """A cached entry {"small": [[rows, rate], ...], "large": ...} as tables, or None if malformed."""
    try:
        return {size: tuple((int(r), float(x)) for r, x in entry[size]) for size in SIZES}
    except (KeyError, TypeError, ValueError):
        return None


def _write(path: Path, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(suffix=".json", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def load_or_measure(threads: int, measure: Callable[[int], dict[str, Table]] = calibrate,
                    probe: Callable[[int], ThreadGovernor] = ThreadGovernor) -> dict[str, Table]:
    """The tables for `threads` from the cache file, measured under its lock when absent or malformed, and then
    written unless contended: at more than one thread, when other processes kept at least CONTENDED cores' worth
    of this process's CPUs busy during the measurement (`probe(threads).others()`, threads.py), its wall-clock
    times say more about them than about this CPU, so the tables serve this process only and a later one
    measures again. FALLBACK when the kernel library is missing, the timings are unusable or the cache cannot be
    written."""
    if library() is None:
        return dict(FALLBACK)
    path = cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            data = _read(path)
            tables = _parse(data["threads"].get(str(threads))) if data else None
            if tables is None:
                watch = probe(threads) if threads > 1 else None
                tables = measure(threads)
                if watch is None or (watch.others() or 0.0) < CONTENDED:
                    data = data or {"cpu": cpu_signature().splitlines()[0], "threads": {}}
                    data["threads"][str(threads)] = {size: [list(p) for p in t] for size, t in tables.items()}
                    _write(path, data)
            return tables
    except (OSError, CalibrationError):
        return dict(FALLBACK)


_tables: dict[int, dict[str, Table]] = {}


def tables_now() -> dict[str, Table]:
    """The tables at torch's current thread count, loaded or measured once per process and thread count."""
    threads = torch.get_num_threads()
    if threads not in _tables:
        _tables[threads] = load_or_measure(threads)
    return _tables[threads]


def crossover(rows: int, n_weights: int) -> float | None:
    """The firing rate up to which the event path runs for a call of `rows` rows on a layer of `n_weights`
    (in * out) weights at torch's current thread count; None: the dense matmul at any rate."""
    table = tables_now()["large" if n_weights >= LARGE_WEIGHTS else "small"]
    return next((rate for limit, rate in table if rows <= limit), None)


def max_event_rows() -> int:
    """The most rows at which the event path wins on some layer size at torch's current thread count (0: none)."""
    return max((limit for table in tables_now().values() for limit, _ in table), default=0)
