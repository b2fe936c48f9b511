"""Which code produced a result: recorded in every stage's done.json, so that a study whose runs span several
sessions (and commits) says which commit each number came from.

code_version() -> {"commit": 40-hex git commit of the source tree or None, "dirty": whether tracked files
differed from it (None when unknown), "package": spikedistill's installed version or None, "torch": torch's
version}. The commit is read with `git` from the folder holding this package, so an editable install or a
checkout reports its commit; an installed wheel, or a machine without git, reports None. Never raises.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True, timeout=10,
                             check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout if out.returncode == 0 else None


@functools.cache
def code_version() -> dict:
    """The commit, dirty flag and package versions of the running code (see the module docstring)."""
    import torch

    top = _git("rev-parse", "--show-toplevel")  # a wheel in a venv inside some checkout is not that checkout
    commit = _git("rev-parse", "HEAD") if top and Path(top.strip()).resolve() == ROOT else None
    commit = commit.strip() if commit else None
    status = _git("status", "--porcelain", "--untracked-files=no") if commit else None
    try:
        from importlib.metadata import PackageNotFoundError, version

        package = version("spikedistill")
    except PackageNotFoundError:
        package = None
    return {"commit": commit, "dirty": None if status is None else bool(status.strip()), "package": package,
            "torch": torch.__version__}
