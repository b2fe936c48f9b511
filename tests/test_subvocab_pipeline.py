"""Exact teacher targets over a derived student vocabulary through the pipeline (tiny random Llama teacher of
tests/conftest.py, student.vocab=subset:290): the teacher_cache stage stores top-k over the student's vocabulary
in the usual format, keyed by the vocabulary; distill trains on them cached or online (rows carry their teacher
views); with k = the whole student vocabulary the two KD losses agree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pipeline.cli import main

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
        "want of a wife. To be, or not to be, that is the question. ") * 12

RECIPE = """\
run: {{name: subkd, seed: 0}}
data: {{sources: [{corpus}], seq_len: 16, val_fraction: 0.1}}
teacher: {{spec: {teacher}, dtype: fp32}}
student: {{preset: tiny, config: {{n_layer: 1, d_model: 16, n_head: 2}}, vocab: "subset:290"}}
align: {{enabled: false}}
teacher_cache: {{k: 290, value_dtype: fp32, batch_size: 4}}
distill:
  train: {{steps: 2, batch_size: 2, eval_every: 2, eval_batches: 1, checkpoint_every: 2, log_every: 1}}
  weights: {{sta: 1.0, hta: 0.5}}
  kd: {{temperature: 2.0}}
"""


FLOOR = 0.6  # teacher_cache.branch_floor of the floored runs: skips most of the tiny teacher's branch tokens


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_teacher_dir) -> Path:
    folder = tmp_path_factory.mktemp("recipe")
    (folder / "corpus.txt").write_text(TEXT, encoding="utf-8")
    path = folder / "recipe.yaml"
    path.write_text(RECIPE.format(corpus=folder / "corpus.txt", teacher=tiny_teacher_dir), encoding="utf-8")
    return path


def run(recipe: Path, run_dir: Path, stages: str, *overrides: str) -> list[dict]:
    assert main(["run", str(recipe), "--run-dir", str(run_dir), "--stages", stages, *overrides]) == 0
    return [json.loads(x) for x in (run_dir / "distill" / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(recipe, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    floor = f"teacher_cache.branch_floor={FLOOR}"
    return {"cached": (root / "cached", run(recipe, root / "cached", "prepare,teacher_cache,distill",
                                           "teacher_cache.enabled=true")),
            "online": (root / "online", run(recipe, root / "online", "prepare,distill")),
            "cached_floor": (root / "cached_floor", run(recipe, root / "cached_floor", "prepare,teacher_cache,distill",
                                                       "teacher_cache.enabled=true", floor)),
            "online_floor": (root / "online_floor", run(recipe, root / "online_floor", "prepare,distill", floor))}


def first_train_step(runs, name: str) -> dict:
    return next(r for r in runs[name][1] if r["split"] == "train")


def test_the_cache_holds_exact_top_k_over_the_student_vocabulary(runs, tiny_teacher_dir):
    from transformers import AutoTokenizer

    from teachers import load_teacher
    from teachers.cache import SUBVOCAB_TARGETS, TeacherCache
    from teachers.data import TokenDataset
    from teachers.subvocab import PieceTrie, exact_log_probs, floored
    from teachers.vocab import VocabMap

    run_dir = runs["cached"][0]
    cache = TeacherCache(run_dir / "teacher_cache" / "cache")
    assert cache.key["vocab"] == "subset:290" and cache.key["targets"] == SUBVOCAB_TARGETS and cache.k == 290
    dataset = TokenDataset(run_dir / "prepare" / "dataset")
    teacher = load_teacher(tiny_teacher_dir)
    student = AutoTokenizer.from_pretrained(run_dir / "prepare" / "tokenizer")
    trie = PieceTrie.from_vocab(VocabMap.build(teacher.tokenizer, student, "subset:290"))
    # the cache holds the targets at the distillation temperature (the recipe's distill.kd.temperature)
    exact = floored(exact_log_probs(teacher, trie, [dataset.teacher_view(1)]))[0]
    expected = torch.log_softmax(exact.double() / cache.temperature, dim=-1).float()
    stored = cache[1]
    dense = torch.full_like(expected, float("nan")).scatter(-1, stored.ids, stored.logprobs)
    torch.testing.assert_close(dense, expected, atol=1e-5, rtol=0)
    assert float(stored.tail_mass.max()) < 1e-5


def test_cached_and_online_kd_agree(runs):
    """k = the student's whole vocabulary leaves no tail bucket, so sparse KD is the dense KD: the first step's
    KD (same student initialisation, same rows) is the same number whether targets come from the cache or
    from the teacher online."""
    cached, online = (first_train_step(runs, name) for name in ("cached", "online"))
    assert cached["kd"] > 0
    assert cached["kd"] == pytest.approx(online["kd"], rel=1e-4)
    assert cached["ce"] == pytest.approx(online["ce"], rel=1e-6)
    assert "teacher_cache" not in json.loads((runs["online"][0] / "distill" / "done.json").read_text())["inputs"]


def test_a_branch_floor_reaches_the_cache_and_the_online_targets(runs):
    """teacher_cache.branch_floor keys the cache (its targets marker), is counted in the stage's metrics, and gives
    the same first-step KD cached (k = the whole vocabulary) and online, other than the exact targets' KD."""
    from teachers.cache import SUBVOCAB_TARGETS, TeacherCache

    run_dir = runs["cached_floor"][0]
    assert TeacherCache(run_dir / "teacher_cache" / "cache").key["targets"] == f"{SUBVOCAB_TARGETS} branch_floor={FLOOR}"
    branches = json.loads((run_dir / "teacher_cache" / "done.json").read_text())["metrics"]["branches"]
    assert branches["needed"] > branches["evaluated"] > 0
    cached, online = (first_train_step(runs, name) for name in ("cached_floor", "online_floor"))
    # measured: cached and online 1e-7 apart (relative), the floor moves KD by 1.5e-4
    assert cached["kd"] == pytest.approx(online["kd"], rel=1e-5)
    assert online["kd"] != pytest.approx(first_train_step(runs, "online")["kd"], rel=1e-5)
