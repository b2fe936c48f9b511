"""Prepare `.whl/`: the wheels the GPU check (bench/gpu_check.py) needs on a machine that has no network and
lacks them, at the versions of requirements/lock.txt, for Python 3.12 on x86-64 Linux; 64 MiB at most.

    .venv/bin/python -m bench.gpu_wheels [--dest .whl] [--dry-run] [--no-deepspeed]

Which packages: omegaconf (the recipes) and DeepSpeed (the ZeRO-2 section), with every package they require
(as installed here, requirements without extras) that the GPU machine does not have; it has Python 3.12,
PyTorch, Triton, transformers, accelerate, safetensors, tokenizers, numpy, pyarrow, tqdm, PyYAML, mpi4py and
what those require (GPU_MACHINE). Wheels come from `pip download --only-binary=:all:` for CPython 3.12 on the
manylinux tags; DeepSpeed has only an sdist on PyPI, so it is built here with DS_BUILD_OPS=0 (a pure-Python
wheel whose ops would compile on first use; the check's ZeRO-2 run with torch's AdamW needs none).
On the GPU machine: python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade
--target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD; make gpu-check
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements" / "lock.txt"
WANTED = ("omegaconf", "deepspeed")
BUILT_HERE = ("deepspeed",)  # sdist only on PyPI
GPU_MACHINE = ("torch", "triton", "transformers", "accelerate", "safetensors", "tokenizers", "numpy", "pyarrow",
               "tqdm", "pyyaml", "mpi4py")
# required here by a GPU_MACHINE package's newer release for its command line only (huggingface-hub's CLI),
# so not promised there: what it requires (pydantic, which DeepSpeed needs) is shipped
NOT_PROMISED = ("typer",)
LIMIT_BYTES = 64 * 2**20
PLATFORM = ["--python-version", "3.12", "--implementation", "cp", "--platform", "manylinux_2_28_x86_64",
            "--platform", "manylinux_2_17_x86_64", "--platform", "manylinux2014_x86_64"]


def lock_pins(lock: Path = LOCK) -> dict[str, str]:
    """{canonical name: version} of every `name==version` pin in the lock file."""
    pins = re.findall(r"^([A-Za-z0-9][A-Za-z0-9_.-]*)==([^\s\\;]+)", lock.read_text(), flags=re.MULTILINE)
    return {canonicalize_name(n): v.split("+")[0] for n, v in pins}


def requirement_closure(names, skip=()) -> set[str]:
    """Canonical names of the installed distributions `names` and everything they require (no extras), not
    following the requirements of `skip`."""
    found, todo = set(), [canonicalize_name(n) for n in names]
    while todo:
        name = todo.pop()
        if name in found or name in skip:
            continue
        found.add(name)
        try:
            requires = distribution(name).requires or []
        except PackageNotFoundError:
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(canonicalize_name(req.name))
    return found


def plan(deepspeed: bool = True, lock: Path = LOCK) -> list[tuple[str, str]]:
    """[(name, version)] of the wheels to prepare, sorted; raises SystemExit if the lock lacks one."""
    wanted = [w for w in WANTED if deepspeed or w != "deepspeed"]
    names = sorted(requirement_closure(wanted) - requirement_closure(GPU_MACHINE, skip=NOT_PROMISED))
    pins = lock_pins(lock)
    missing = [n for n in names if n not in pins]
    if missing:
        raise SystemExit(f"gpu_wheels: {missing} not pinned in {lock}; run make lock")
    return [(n, pins[n]) for n in names]


def commands(wheels: list[tuple[str, str]], dest: Path) -> list[tuple[list[str], dict]]:
    """The pip commands (argv, extra environment) that put each wheel into dest."""
    pip = [sys.executable, "-m", "pip"]
    out = []
    for name, version in wheels:
        if name in BUILT_HERE:
            out.append(([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(dest), f"{name}=={version}"],
                        {"DS_BUILD_OPS": "0"}))  # fmt: skip
        else:
            out.append(([*pip, "download", "--no-deps", "--only-binary=:all:", *PLATFORM, "-d", str(dest),
                         f"{name}=={version}"], {}))  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dest", default=str(ROOT / ".whl"), help="folder for the wheels (default .whl)")
    parser.add_argument("--dry-run", action="store_true", help="print the pip commands, run nothing")
    parser.add_argument("--no-deepspeed", action="store_true", help="omegaconf only")
    args = parser.parse_args(argv)
    dest = Path(args.dest)
    for argv_, env in commands(plan(not args.no_deepspeed), dest):
        print(" ".join(f"{k}={v}" for k, v in env.items()), *argv_)
        if not args.dry_run:
            dest.mkdir(parents=True, exist_ok=True)
            subprocess.run(argv_, check=True, env={**os.environ, **env})
    if args.dry_run:
        return 0
    sizes = {p.name: p.stat().st_size for p in sorted(dest.glob("*.whl"))}
    for name, size in sizes.items():
        print(f"{size / 2**20:8.2f} MiB  {name}")
    total = sum(sizes.values())
    print(f"{total / 2**20:8.2f} MiB  in {dest} (limit {LIMIT_BYTES / 2**20:.0f} MiB)")
    if total > LIMIT_BYTES:
        print(f"gpu_wheels: {dest} holds more than 64 MiB; rerun with --no-deepspeed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
