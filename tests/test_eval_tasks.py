"""The offline task suite: the build script reproduces the committed data byte for byte, every MC task has
>= 200 well-formed items, and lm-eval finds all local tasks and groups without touching the network."""

from __future__ import annotations

import json

import yaml

from eval.harness import TASKS_DIR, local_task_names
from eval.tasks import build

DATA = TASKS_DIR / "data"
MC = ["persuasion_next_sentence", "hamlet_next_line", "persuasion_cloze"]
ZERO_SHOT_8 = [
    "arc_easy",
    "arc_challenge",
    "winogrande",
    "boolq",
    "piqa",
    "hellaswag",
    "openbookqa",
    "headqa_en",
]


def test_build_reproduces_committed_data(tmp_path):
    build.main(["--out", str(tmp_path)])
    for path in sorted(DATA.glob("*.jsonl")):
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name


def test_mc_items_are_well_formed():
    for name in MC:
        rows = [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text().splitlines()]
        assert len(rows) >= 200
        for row in rows:
            assert len(row["choices"]) == 4 == len(set(row["choices"])) and row["context"]
            assert 0 <= row["label"] < 4
        labels = [r["label"] for r in rows]
        assert max(labels.count(i) for i in range(4)) < 0.4 * len(rows)  # gold position is shuffled


def test_ppl_docs_are_bounded_slices():
    for name in ("ppl_persuasion", "ppl_hamlet"):
        rows = [json.loads(line) for line in (DATA / f"{name}.jsonl").read_text().splitlines()]
        assert len(rows) == build.PPL_DOCS
        # packed up to PPL_DOC_CHARS, except a single paragraph that is longer on its own
        assert all(0 < len(r["text"]) <= build.PPL_DOC_CHARS or "\n" not in r["text"] for r in rows)


def test_lm_eval_finds_local_tasks_and_groups():
    names = local_task_names()
    for task in [
        "spikedistill_ppl_persuasion",
        "spikedistill_ppl_hamlet",
        "spikedistill_offline",
        "spikedistill_mc",
        "bispikclm_zeroshot8",
    ] + [f"spikedistill_{m}" for m in MC]:
        assert task in names
    group = yaml.safe_load((TASKS_DIR / "bispikclm_zeroshot8.yaml").read_text())
    assert group["task"] == ZERO_SHOT_8
