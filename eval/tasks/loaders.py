"""Dataset loaders for the local task YAMLs (`custom_dataset: !function loaders.<name>`): read the JSONL
files in data/ next to this file, so the tasks run offline from any working directory."""

from __future__ import annotations

import json
from pathlib import Path

import datasets

DATA_DIR = Path(__file__).parent / "data"


def _split(filename: str) -> dict:
    rows = [
        json.loads(line) for line in (DATA_DIR / filename).read_text(encoding="utf-8").splitlines() if line
    ]
    return datasets.DatasetDict({"validation": datasets.Dataset.from_list(rows)})


def ppl_persuasion(**_metadata):
    return _split("ppl_persuasion.jsonl")


def ppl_hamlet(**_metadata):
    return _split("ppl_hamlet.jsonl")


def persuasion_next_sentence(**_metadata):
    return _split("persuasion_next_sentence.jsonl")


def hamlet_next_line(**_metadata):
    return _split("hamlet_next_line.jsonl")


def persuasion_cloze(**_metadata):
    return _split("persuasion_cloze.jsonl")
