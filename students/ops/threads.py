"""How many intra-op threads torch and the CPU kernels run: the cores this process may use, minus the ones other
processes keep busy.

Why: torch's OpenMP pool (which our kernels share) splits each op statically across its threads and waits at a
barrier for the last one. When another process runs on one of those cores, the thread there gets a fraction of
it, and every parallel region waits for it: on the 2-core box one busy loop slowed the teacher's 2-thread
forward 2.6x, and a loaded machine (load ~10) made it 4-6x slower than the same forward on one thread
(bench/contention.py). As many threads as free cores avoid the waits and leave each process whole cores.

- `available_cores()`: the CPUs in this process's affinity mask (`sched_getaffinity`: taskset, cpusets),
  capped by the cgroup CPU quota (v2 `cpu.max`, v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us`), rounded up.
- `default_threads()`: `OMP_NUM_THREADS` if set (the user's choice is kept as is), else `available_cores()`.
- `configure_threads()` (the CLI calls it once at start): sets torch to `default_threads()` and, unless
  `OMP_NUM_THREADS` is set, turns on the governor, starting from the 1-minute load average: every `interval`
  seconds of work it measures how many of those cores other processes used since the last look (/proc/stat
  busy and steal time on the allowed CPUs, minus this process's own CPU time) and runs
  `max(1, cores - round(others))` threads. The check runs in `csrc.threads()`, i.e. before each fused kernel
  call, and before each forward of a `watch`ed model (the teacher), on the thread that computes (OpenMP thread
  counts are per calling thread); between checks it costs one clock read.
"""
from __future__ import annotations

import math
import os
import resource
import time
from pathlib import Path

import torch

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _cgroup_quota_cores() -> float | None:
    """The cgroup CPU quota in cores (quota / period), or None when unlimited or unknown."""
    try:
        groups = [line.split(":", 2) for line in Path("/proc/self/cgroup").read_text().splitlines()]
    except OSError:
        return None
    for _, controllers, rel in groups:
        rel = rel.lstrip("/")
        try:
            if controllers == "":  # cgroup v2: "max 100000" or "<quota> <period>"
                for path in (CGROUP_ROOT / rel / "cpu.max", CGROUP_ROOT / "cpu.max"):
                    if path.is_file():
                        quota, period = path.read_text().split()[:2]
                        return None if quota == "max" else int(quota) / int(period)
            elif "cpu" in controllers.split(","):  # cgroup v1: a quota of -1 means unlimited
                for base in (CGROUP_ROOT / controllers / rel, CGROUP_ROOT / controllers, CGROUP_ROOT / "cpu"):
                    if (base / "cpu.cfs_quota_us").is_file():
                        quota = int((base / "cpu.cfs_quota_us").read_text())
                        return None if quota <= 0 else quota / int((base / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError, IndexError):
            continue
    return None


def available_cores() -> int:
    """CPUs this process may run on: its affinity mask, capped by the cgroup quota (rounded up), at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = _cgroup_quota_cores()
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def default_threads() -> int:
    """OMP_NUM_THREADS when set to a positive integer, else `available_cores()`.

    Raises ValueError naming OMP_NUM_THREADS when it is set to something else.
    """
    raw = os.environ.get("OMP_NUM_THREADS", "").strip()
    if not raw:
        return available_cores()
    try:
        n = int(raw.split(",")[0])  # OpenMP allows a list per nesting level; the first is ours
    except ValueError:
        n = 0
    if n < 1:
        raise ValueError(f"OMP_NUM_THREADS must be a positive integer, got {raw!r}; unset it or set e.g. 2")
    return n


def _busy_ticks(cpus: set[int]) -> int | None:
    """Busy + steal clock ticks since boot summed over `cpus` (/proc/stat), or None if unreadable."""
    try:
        total = 0
        for line in Path("/proc/stat").read_text().splitlines():
            if not line.startswith("cpu") or line.startswith("cpu "):
                continue
            name, *fields = line.split()
            if int(name[3:]) in cpus:
                v = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
                total += v[0] + v[1] + v[2] + v[5] + v[6] + v[7]
        return total
    except (OSError, ValueError):
        return None


def _own_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class ThreadGovernor:
    """Sets torch's thread count from the cores other processes leave free; see the module docstring."""

    def __init__(self, cores: int, interval: float = 2.0):
        self.cores, self.interval = cores, interval
        self.cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else set(range(cores))
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._mark()

    def _mark(self) -> None:
        self.t, self.busy, self.own = time.monotonic(), _busy_ticks(self.cpus), _own_seconds()

    def others(self) -> float | None:
        """Cores' worth of CPU other processes used on our CPUs since the last look (None: unknown)."""
        t, busy, own = time.monotonic(), _busy_ticks(self.cpus), _own_seconds()
        if busy is None or self.busy is None or t - self.t <= 0:
            return None
        used = (busy - self.busy) / self.hz - (own - self.own)
        return max(0.0, used / (t - self.t))

    def decide(self, others: float) -> int:
        """Threads to run when other processes keep `others` cores' worth busy: the cores they leave, >= 1."""
        return max(1, min(self.cores, self.cores - math.floor(others + 0.5)))

    def tick(self) -> None:
        """Re-decide the thread count if `interval` seconds passed since the last decision."""
        if time.monotonic() - self.t < self.interval:
            return
        others = self.others()
        self._mark()
        if others is not None:
            _set_threads(self.decide(others))


def _set_threads(n: int) -> None:
    if n != torch.get_num_threads():
        torch.set_num_threads(n)


_governor: ThreadGovernor | None = None


def governor() -> ThreadGovernor | None:
    """The active governor (None unless `configure_threads` turned it on)."""
    return _governor


def tick() -> None:
    """Let the governor, if on, re-decide the thread count (cheap between its intervals)."""
    if _governor is not None:
        _governor.tick()


def watch(module: torch.nn.Module) -> None:
    """Tick before every forward of `module`: for models that call no fused kernel (the teacher), whose loops
    would otherwise never give the governor a chance to adapt."""
    module.register_forward_pre_hook(lambda *_: tick())


def configure_threads(adaptive: bool = True, interval: float = 2.0) -> int:
    """Set torch's intra-op threads to `default_threads()`; with `adaptive` and no OMP_NUM_THREADS, turn on the
    governor too, starting from the 1-minute load average when this process may use every CPU of the machine
    (a cpuset or quota makes the machine-wide figure meaningless; the first measured interval decides then).
    Returns the thread count set now. Raises ValueError for a malformed OMP_NUM_THREADS."""
    global _governor
    n = default_threads()
    _governor = None
    if adaptive and not os.environ.get("OMP_NUM_THREADS"):
        _governor = ThreadGovernor(n, interval)
        if len(_governor.cpus) == (os.cpu_count() or 0) and hasattr(os, "getloadavg"):
            n = _governor.decide(os.getloadavg()[0])
    torch.set_num_threads(n)
    return n
