"""What CPU a benchmark ran on: model name, vector flags, clock, and the theoretical fp32 FMA peak.

Read from /proc/cpuinfo and `lscpu` (Linux); fields that cannot be read are None. The peak assumes two FMA
units per core, as on Intel Xeon Gold/Platinum since Skylake-SP and AMD Zen 2-5: per cycle and core,
2 units x lanes x 2 flops (a fused multiply-add is two), with 8 fp32 lanes for AVX2 and 16 for AVX-512. AMD Zen 4
(family 25 with AVX-512) runs a 512-bit FMA as two 256-bit halves, so it gets AVX2's 8 lanes.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

FMA_UNITS = 2  # the assumption above
ZEN4_FAMILY = 25


@dataclass
class Cpu:
    model: str
    vendor: str | None
    family: int | None
    flags: frozenset[str]
    mhz_now: float | None  # /proc/cpuinfo "cpu MHz" (under a hypervisor often the nominal clock)
    mhz_max: float | None  # lscpu "CPU max MHz", when the kernel exposes it
    cores: int  # CPUs this process may run on

    @property
    def fma_lanes(self) -> int | None:
        """fp32 lanes of one FMA instruction as the hardware executes it (None: no FMA)."""
        if "avx512f" in self.flags and not (self.vendor == "AuthenticAMD" and self.family == ZEN4_FAMILY):
            return 16
        return 8 if {"avx2", "fma"} <= self.flags else None

    @property
    def clock_mhz(self) -> tuple[float | None, str]:
        """(MHz the peak is computed at, where it was read)."""
        if self.mhz_max:
            return self.mhz_max, "lscpu CPU max MHz"
        return self.mhz_now, "/proc/cpuinfo cpu MHz"

    @property
    def flops_per_cycle(self) -> int | None:
        """fp32 flops per cycle and core at the FMA peak: FMA_UNITS x lanes x 2 (None: no FMA)."""
        return None if self.fma_lanes is None else FMA_UNITS * self.fma_lanes * 2

    def fma_peak_gflops(self, cores: int = 1) -> float | None:
        """Theoretical fp32 GFLOP/s of `cores` cores: flops_per_cycle x clock."""
        mhz, _ = self.clock_mhz
        if self.flops_per_cycle is None or mhz is None:
            return None
        return self.flops_per_cycle * mhz * 1e-3 * cores


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo ({} where unreadable)."""
    try:
        text = Path("/proc/cpuinfo").read_text().split("\n\n")[0]
    except OSError:
        return {}
    return {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in text.splitlines()) if v}


def _lscpu_max_mhz() -> float | None:
    if shutil.which("lscpu") is None:
        return None
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    found = re.search(r"^CPU max MHz:\s*([\d.]+)", out, flags=re.MULTILINE)
    return float(found.group(1)) if found else None


def cpu() -> Cpu:
    info = _cpuinfo()
    number = (lambda key: float(info[key]) if key in info else None)
    return Cpu(
        model=info.get("model name", "unknown CPU"),
        vendor=info.get("vendor_id"),
        family=int(info["cpu family"]) if "cpu family" in info else None,
        flags=frozenset(info.get("flags", "").split()),
        mhz_now=number("cpu MHz"),
        mhz_max=_lscpu_max_mhz(),
        cores=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1,
    )


def describe_cpu(c: Cpu | None = None) -> str:
    """One line: model, vendor/family, the vector flags that matter here, clock, cores, load average."""
    c = c or cpu()
    vector = " ".join(f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile") if f in c.flags) or "none"
    mhz, source = c.clock_mhz
    clock = f"{mhz:.0f} MHz ({source})" if mhz else "clock unknown"
    return (f"CPU: {c.model} ({c.vendor}, family {c.family}); flags {vector}; {clock}; {c.cores} usable cores; "
            f"load average {os.getloadavg()[0]:.1f}")
