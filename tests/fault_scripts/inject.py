"""Run the real `spikedistill` CLI with one fault injected (used by tests/test_faults.py).

    python tests/fault_scripts/inject.py FAULT ARG -- run RECIPE ...

FAULT (ARG is an int):
  none             no fault
  kill_step N      SIGKILL at the start of training step N (1-based) of the first training stage that gets there
  kill_ckpt N      SIGKILL while checkpoint N is written: its files are on disk, its manifest is not
  kill_prepare 0   SIGKILL after the prepared split files are written, before the directory is renamed into place
  kill_cache N     SIGKILL after cache shard N is written (the next shard is left half-written on disk)
  small_shards 0   no fault, cache shards of 4 rows (as kill_cache uses)
  pause_step N     at training step N touch $INJECT_PAUSE_FLAG and sleep (the lock stays held)
  term_step N      SIGTERM to itself during training step N (pre-emption)
  int_step N       SIGINT to itself during training step N (Ctrl-C)
  nan_from N       the training loss is NaN from step N on
The fault hooks patch module attributes, so the code under test is exactly the shipped code.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path


def _kill() -> None:
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def _patch_trainer(fault: str, n: int) -> None:
    from pipeline import trainer

    original = trainer.Trainer._train_step

    def step(self):
        upcoming = self.step + 1
        if fault == "kill_step" and upcoming == n:
            _kill()
        if fault == "pause_step" and upcoming == n:
            # tell the test this run holds the lock mid-training, then wait to be killed
            Path(os.environ["INJECT_PAUSE_FLAG"]).touch()
            time.sleep(600)
        if fault == "term_step" and upcoming == n:
            os.kill(os.getpid(), signal.SIGTERM)
        if fault == "int_step" and upcoming == n:
            os.kill(os.getpid(), signal.SIGINT)
        if fault == "nan_from" and upcoming >= n:
            forward = self.model.forward

            def nan_forward(**batch):
                out = forward(**batch)
                return {**out, "loss": out["loss"] * float("nan")}

            self.model.forward = nan_forward
            try:
                return original(self)
            finally:
                self.model.forward = forward
        return original(self)

    trainer.Trainer._train_step = step


def _patch_checkpoint(n: int) -> None:
    from pipeline import checkpoint

    original = checkpoint._write_manifest

    def write_manifest(folder):
        if folder.name.endswith(f"{n:07d}"):
            _kill()
        original(folder)

    checkpoint._write_manifest = write_manifest


def _patch_prepare() -> None:
    from teachers import data

    def replace_dir(tmp, out_dir):
        _kill()

    data._replace_dir = replace_dir


def _small_shards() -> None:
    """Cache shards of 4 rows (the stage uses 256), so a tiny corpus spans several shards."""
    from teachers import cache

    build = cache.build_teacher_cache
    cache.build_teacher_cache = lambda *a, **kw: build(*a, **{**kw, "shard_size": 4})


def _patch_cache(n: int) -> None:
    from teachers import cache

    _small_shards()

    original = cache._write_shard

    def write_shard(out_dir, i, tensors, first_row):
        if i == n + 1:
            tmp = out_dir / f".{cache._shard_path(out_dir, i).name}.tmp-{os.getpid()}"
            tmp.write_bytes(b"half a shard")
            _kill()
        original(out_dir, i, tensors, first_row)

    cache._write_shard = write_shard


def main(argv: list[str]) -> int:
    fault, arg, sep, *cli = argv
    assert sep == "--", "usage: inject.py FAULT ARG -- CLI ARGS"
    n = int(arg)
    if fault in ("kill_step", "term_step", "int_step", "nan_from", "pause_step"):
        _patch_trainer(fault, n)
    elif fault == "kill_ckpt":
        _patch_checkpoint(n)
    elif fault == "kill_prepare":
        _patch_prepare()
    elif fault == "kill_cache":
        _patch_cache(n)
    elif fault == "small_shards":
        _small_shards()
    elif fault != "none":
        raise SystemExit(f"inject.py: unknown fault {fault!r}")
    from pipeline.cli import main as cli_main

    return cli_main(cli)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
