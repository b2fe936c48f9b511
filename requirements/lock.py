"""Regenerate requirements/lock.txt (`make lock`): every package `make venv` installs, pinned with hashes.

1. pip-compile (pip-tools) resolves pyproject.toml's dependencies, its dev, deepspeed and triton extras and
   requirements/lock.in to the newest versions their ranges allow, for the running Python and platform,
   with the sha256 of every file pip may install.
2. The packages of requirements/no-deps.in are appended at their newest version, with their hashes, and
   without their dependencies (`make venv` installs the whole lock with --no-deps).

Usage: python requirements/lock.py [--keep]     --keep: keep existing pins where the ranges allow them
       python requirements/lock.py --only NAME...  print the locked entries (with hashes) of these packages
                                                   (`make venv` installs the build tools and torch first)
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
LOCK = HERE / "lock.txt"
EXTRAS = ("dev", "deepspeed", "triton")


def requirements(path: Path) -> list[str]:
    """The requirement lines of a .in file (comments and blank lines dropped)."""
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [line for line in lines if line]


def compile_lock(keep: bool) -> str:
    """pip-compile's output for pyproject.toml + lock.in (the resolved, hashed set)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "lock.txt"
        if keep and LOCK.exists():
            out.write_text(LOCK.read_text())
        cmd = [sys.executable, "-m", "piptools", "compile", "--quiet", "--generate-hashes", "--allow-unsafe",
               "--strip-extras", "--no-emit-index-url", "--no-emit-find-links", "--output-file", str(out), *(f"--extra={e}" for e in EXTRAS)]
        if not keep:
            cmd.append("--upgrade")
        env = {**os.environ, "CUSTOM_COMPILE_COMMAND": "make lock"}
        subprocess.run([*cmd, "pyproject.toml", str(HERE / "lock.in")], cwd=ROOT, check=True, env=env)
        text = out.read_text()
    # pip-compile writes the input paths it was given; keep the file independent of the temp directory.
    return re.sub(r"-r \S*lock\.in", "-r requirements/lock.in", text)


def no_deps_block() -> str:
    """Pinned, hashed lines for requirements/no-deps.in, resolved without their dependencies."""
    lines = ["# Installed without their dependencies (requirements/no-deps.in):"]
    with tempfile.TemporaryDirectory() as tmp:
        for req in requirements(HERE / "no-deps.in"):
            subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", tmp, req],
                           check=True)
        for wheel in sorted(Path(tmp).iterdir()):
            name, version = wheel.name.split("-")[:2]
            digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
            lines.append(f"{name.replace('_', '-').lower()}=={version} \\\n    --hash=sha256:{digest}")
    return "\n".join(lines) + "\n"


def locked_entries(names: list[str]) -> str:
    """The lock's entries (pin line and hash lines) for `names`; SystemExit naming any that are missing."""
    entries, current = {}, None
    for line in LOCK.read_text().splitlines():
        pinned = re.match(r"([A-Za-z0-9_.-]+)==", line)
        if pinned:
            current = pinned.group(1).lower()
            entries[current] = [line]
        elif current and line.startswith("    --hash"):
            entries[current].append(line)
        else:
            current = None
    missing = [n for n in names if n.lower() not in entries]
    if missing:
        raise SystemExit(f"{LOCK.relative_to(ROOT)} has no entry for {', '.join(missing)}: run make lock")
    return "\n".join("\n".join(entries[n.lower()]) for n in names) + "\n"


def main() -> None:
    if sys.argv[1:2] == ["--only"]:
        sys.stdout.write(locked_entries(sys.argv[2:]))
        return
    LOCK.write_text(compile_lock(keep="--keep" in sys.argv[1:]) + "\n" + no_deps_block())
    print(f"wrote {LOCK.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
