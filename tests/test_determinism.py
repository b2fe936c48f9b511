"""Rerunning a recipe at the same seed gives the same numbers: two fresh run directories, one tiny recipe (weight
inheritance and KD from a teacher cache built in each run), on CPU, give bit-identical weights and identical
losses and validation bits/byte. A data order not seeded by run.seed (the mutant kept below) breaks it."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch

RECIPE = """\
run: {{name: det, seed: 3}}
data: {{sources: [{corpus}], seq_len: 16, val_fraction: 0.1, split_seed: 0}}
teacher: {{spec: {teacher}, dtype: fp32}}
student: {{preset: tiny, init_from_teacher: true, config: {{n_layer: 2, d_model: 16, n_head: 2}}}}
teacher_cache: {{enabled: true, k: 4, value_dtype: fp32, batch_size: 4}}
align: {{enabled: false}}
distill:
  train: {{steps: 6, batch_size: 2, eval_every: 3, eval_batches: 2, checkpoint_every: 6, log_every: 1,
           optim: {{lr: 1.0e-2, min_lr: 1.0e-3, warmup_steps: 1}}}}
  weights: {{sta: 0.5, hta: 0.5}}
  kd: {{chunk_size: 8}}
"""
TIMING = {"seconds", "train_seconds", "tokens_per_s", "wall_seconds"}  # wall-clock figures differ by nature


def _run(tmp_path: Path, teacher: Path, name: str) -> Path:
    from pipeline.cli import main

    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        corpus.write_text("It is a truth universally acknowledged, that a single man in possession of a good "
                          "fortune, must be in want of a wife. To be, or not to be, that is the question.\n" * 12)
        (tmp_path / "det.yaml").write_text(RECIPE.format(corpus=corpus, teacher=teacher))
    run_dir = tmp_path / name
    assert main(["run", str(tmp_path / "det.yaml"), "--run-dir", str(run_dir),
                 "--stages", "prepare,teacher_cache,distill"]) == 0
    return run_dir


def _numbers(run_dir: Path) -> tuple[dict[str, torch.Tensor], list[dict], dict]:
    """(the distilled student's tensors, every metrics.jsonl row, done.json's final metrics), timings left out."""
    from safetensors.torch import load_file

    from pipeline.runner import read_done

    weights = load_file(str(run_dir / "distill" / "student" / "model.safetensors"))
    rows = [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run_dir / "distill" / "metrics.jsonl").read_text().splitlines()]
    final = {k: v for k, v in read_done(run_dir / "distill")["metrics"].items() if k not in TIMING}
    return weights, rows, final


def _differences(a: Path, b: Path) -> list[str]:
    (wa, ra, fa), (wb, rb, fb) = _numbers(a), _numbers(b)
    diff = [f"weight {k}" for k in sorted(wa.keys() | wb.keys())
            if k not in wa or k not in wb or not torch.equal(wa[k], wb[k])]
    diff += [f"metrics.jsonl row {i}" for i, (x, y) in enumerate(zip(ra, rb)) if x != y]
    diff += ["metrics.jsonl length"] if len(ra) != len(rb) else []
    diff += [f"final {k}" for k in sorted(fa.keys() | fb.keys()) if fa.get(k) != fb.get(k)]
    return diff


@pytest.mark.slow
def test_a_rerun_at_the_same_seed_gives_bit_identical_weights_and_metrics(tmp_path, tiny_teacher_dir):
    first = _run(tmp_path, tiny_teacher_dir, "first")
    second = _run(tmp_path, tiny_teacher_dir, "second")
    _, rows, final = _numbers(first)
    assert final["kd"] > 0 and final["val_bits_per_byte"] > 0  # KD from the cache, and a validation score
    assert sum(r["split"] == "val" for r in rows) == 2 and sum(r["split"] == "train" for r in rows) == 6
    assert _differences(first, second) == []


@pytest.mark.slow
def test_an_unseeded_data_order_is_caught(tmp_path, tiny_teacher_dir, monkeypatch):
    """The mutant: each epoch's order drawn from the clock instead of run.seed."""
    from pipeline import trainer

    def unseeded_index(self, position: int) -> int:
        epoch, offset = divmod(position, self.n)
        if not self.shuffle:
            return offset
        if epoch not in self._perms:
            clock = torch.Generator().manual_seed(time.perf_counter_ns())
            self._perms = {epoch: torch.randperm(self.n, generator=clock)}
        return int(self._perms[epoch][offset])

    monkeypatch.setattr(trainer.DataStream, "index", unseeded_index)
    first = _run(tmp_path, tiny_teacher_dir, "first")
    second = _run(tmp_path, tiny_teacher_dir, "second")
    assert any(d.startswith("weight ") for d in _differences(first, second))
