"""How this process was started, so that the commands a run prints (resume, --extend, next steps) run as printed.

The program is named the way the user can type it: `spikedistill` when PATH finds this very executable (an
activated venv), else its path (`.venv/bin/spikedistill` after `make demo`), or `python -m pipeline`. A run
started by a launcher (`accelerate launch ...`, `torchrun ...`, `python -m torch.distributed.run ...`) repeats
the launcher's words: they are read from the parent process's command line (Linux /proc), whose tail is this
process's own arguments; each rank's parent is the launcher, which starts the ranks itself.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

PROGRAM = "spikedistill"
# words that name a launcher (a console script's name, or the module after -m)
LAUNCHERS = ("accelerate", "torchrun", "deepspeed", "torch.distributed.run", "torch.distributed.launch",
             "accelerate.commands.launch")


def typed(path: str) -> str:
    """How a user types the executable `path`: its name when PATH finds that same file, else its path,
    relative to the working directory when inside it."""
    if os.sep not in path:
        return path  # found on PATH when it was started
    name = os.path.basename(path)
    found = shutil.which(name)
    if found and os.path.abspath(found) == os.path.abspath(path):
        return name
    try:
        return str(Path(os.path.abspath(path)).relative_to(Path.cwd()))
    except ValueError:
        return os.path.abspath(path)


def _is_python(word: str) -> bool:
    return os.path.basename(word).startswith("python")


def _drop_interpreter(argv: list[str]) -> list[str]:
    """A console script runs as `python SCRIPT args` (its shebang): keep the script as the command word."""
    if len(argv) > 1 and _is_python(argv[0]) and not argv[1].startswith("-"):
        return [typed(argv[1]), *argv[2:]]
    return [typed(argv[0]), *argv[1:]]


def program_words() -> list[str]:
    """This program as the user can type it again: ['spikedistill'] (found on PATH), its path
    (['.venv/bin/spikedistill']) or ['python', '-m', 'pipeline'] (the interpreter as it was typed). Called from
    other code (a test, a script calling pipeline.cli.main), the `spikedistill` beside this interpreter."""
    orig = list(getattr(sys, "orig_argv", []))
    if "-m" in orig[:-1] and orig[orig.index("-m") + 1] == "pipeline":
        return [typed(orig[0]), "-m", "pipeline"]
    if os.path.basename(sys.argv[0]) == PROGRAM:
        return [typed(sys.argv[0])]
    beside = Path(sys.executable).with_name(PROGRAM)
    return [typed(str(beside)) if beside.is_file() else PROGRAM]


def parent_argv() -> list[str]:
    """The command line of the parent process; [] when unreadable (no /proc)."""
    try:
        raw = Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    except OSError:
        return []
    return [w.decode(errors="replace") for w in raw.split(b"\0") if w]


def launcher_words(parent: list[str] | None = None, argv: list[str] | None = None) -> list[str]:
    """The launcher's words up to and including the program it started (e.g. ['accelerate', 'launch',
    '--multi_gpu', '--num_processes', '2', '-m', 'pipeline']), or [] when no launcher started this process.

    parent: the parent's command line (default: read from /proc); argv: this process's sys.argv. A parent is a
    launcher when one of its first three words names one (LAUNCHERS) and its command line ends with
    argv[1:], the arguments the launcher passed on."""
    parent = parent_argv() if parent is None else parent
    tail = list(sys.argv if argv is None else argv)[1:]
    if not parent or len(parent) <= len(tail) or (tail and parent[-len(tail):] != tail):
        return []
    if not any(os.path.basename(w) in LAUNCHERS for w in parent[:3]):
        return []
    return _drop_interpreter(parent[:len(parent) - len(tail)])


def command(words: list[str], launched: bool = True) -> list[str]:
    """The argv that runs `words` (e.g. ['run', 'recipe.yaml', '--extend']) the way this process was started:
    under its launcher when `launched` and there is one, else as the program alone."""
    launcher = launcher_words() if launched else []
    return [*(launcher or program_words()), *words]
