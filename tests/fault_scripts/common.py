"""Shared pieces of the fault, bad-input and safety tests: a tiny recipe and ways to run the real CLI."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
INJECT = Path(__file__).with_name("inject.py")
STAGES = "prepare,teacher_cache,align,distill"
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
        "want of a wife. To be, or not to be, that is the question. ") * 12

RECIPE = """\
run: {{name: faults, seed: 0}}
data: {{sources: [{corpus}], seq_len: 16, val_fraction: 0.1}}
teacher: {{spec: {teacher}, dtype: fp32}}
student: {{preset: tiny, config: {{n_layer: 1, d_model: 16, n_head: 2}}}}
teacher_cache: {{enabled: true, k: 4, value_dtype: fp32, batch_size: 4}}
align:
  train: {{steps: 2, batch_size: 2, eval_every: 100, eval_batches: 1, checkpoint_every: 1, log_every: 1}}
distill:
  train: {{steps: 6, batch_size: 2, eval_every: 3, eval_batches: 1, checkpoint_every: 2, log_every: 1,
          max_bad_steps: 3}}
  kd: {{chunk_size: 8}}
evaluate: {{texts: [], energy: false, teacher: false, sample_tokens: 2}}
"""


def write_recipe(folder: Path, teacher_dir: Path) -> Path:
    """A tiny 4-stage recipe (58 train rows of 16 tokens, 2 align + 6 distill steps) -> its path."""
    folder.mkdir(parents=True, exist_ok=True)
    corpus = folder / "corpus.txt"
    corpus.write_text(TEXT, encoding="utf-8")
    path = folder / "recipe.yaml"
    path.write_text(RECIPE.format(corpus=corpus, teacher=teacher_dir), encoding="utf-8")
    return path


def cli(args: list[str], fault: str = "none", arg: int = 0, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `spikedistill ARGS` in a fresh process with one fault from inject.py."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, str(INJECT), fault, str(arg), "--", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def file_hashes(folder: Path) -> dict[str, str]:
    """sha256 of every file under folder, by relative path (to show outputs are untouched)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}
