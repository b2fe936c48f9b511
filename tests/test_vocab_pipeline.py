"""student.vocab through the pipeline: the recipe key and its checks before any stage, the prepare hash, and
a CE-only run on subset:N with weight inheritance that exports, generates, and is scored by the evaluate stage
and `spikedistill bpb` (the tiny random Llama teacher of tests/conftest.py). Teacher targets over a derived
vocabulary: tests/test_subvocab_pipeline.py."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from pipeline.cli import main
from pipeline.errors import ConfigError
from pipeline.recipe import load_recipe
from pipeline.runner import stage_config_hash
from pipeline.stages import SPECS

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
        "want of a wife. To be, or not to be, that is the question. ") * 12

RECIPE = """\
run: {{name: subset, seed: 0}}
data: {{sources: [{corpus}], seq_len: 16, val_fraction: 0.1}}
teacher: {{spec: {teacher}, dtype: fp32}}
student: {{preset: tiny, config: {{n_layer: 1, d_model: 16, n_head: 2}}, vocab: "subset:290", init_from_teacher: true}}
align: {{enabled: false}}
distill:
  train: {{steps: 2, batch_size: 2, eval_every: 2, eval_batches: 1, checkpoint_every: 2, log_every: 1}}
  weights: {{sta: 0.0, hta: 1.0}}
evaluate: {{texts: [persuasion], max_text_bytes: 600, context_length: 32, energy: false, teacher: true,
           sample_tokens: 3}}
"""


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_teacher_dir) -> Path:
    folder = tmp_path_factory.mktemp("recipe")
    (folder / "corpus.txt").write_text(TEXT, encoding="utf-8")
    path = folder / "recipe.yaml"
    path.write_text(RECIPE.format(corpus=folder / "corpus.txt", teacher=tiny_teacher_dir), encoding="utf-8")
    return path


def fails(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = re.findall(r"spikedistill: error: [^\r\n]*", err)
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


# ------------------------------------------------------------------------------------ the recipe key
@pytest.mark.parametrize("override", ["student.vocab=subset:abc", "student.vocab=subset", "student.vocab=byte",
                                      "student.vocab=subset:", "student.vocab=bytes:"])
def test_a_misspelt_vocab_is_one_line_naming_the_key_and_the_spellings(override):
    with pytest.raises(ConfigError) as exc:
        load_recipe(None, [override])
    assert str(exc.value).startswith("student.vocab: must be teacher | subset:N | bytes, got ")
    assert "\n" not in str(exc.value)


@pytest.mark.parametrize("overrides, key", [
    (["student.vocab=bytes"], "align.enabled"),
    (["student.vocab=subset:300", "align.enabled=false", "distill.weights.ea=0.1"], "distill.weights.ea"),
    (["student.vocab=subset:300", "align.enabled=false", "distill.weights.sfa=0.1"], "distill.weights.sfa"),
])
def test_spad_feature_terms_are_refused_with_a_derived_vocabulary(overrides, key):
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: must be (false|0) with student.vocab=.*position"):
        load_recipe(None, overrides)


def test_the_vocabulary_enters_the_prepare_hash_and_defaults_keep_their_hashes():
    default = load_recipe(None, [])
    derived = load_recipe(None, ["student.vocab=subset:8192", "align.enabled=false"])
    plain = load_recipe(None, ["align.enabled=false"])
    assert "student.vocab" not in SPECS["prepare"].sections(default)  # runs made before the key keep their hashes
    assert SPECS["prepare"].sections(derived)["student.vocab"] == "subset:8192"
    for stage in ("prepare", "distill", "export", "evaluate"):
        assert stage_config_hash(derived, stage) != stage_config_hash(plain, stage)
    assert "vocab" not in SPECS["distill"].sections(default)["student"]


# -------------------------------------------------------------------------------- before any stage
@pytest.mark.parametrize("override, words", [
    ("student.vocab=subset:5000", ("student.vocab=subset:5000: N must be >= 257 (the teacher's added tokens and 256 "
                                  "byte symbols; that size is student.vocab=bytes) and < 320")),
    ("student.vocab=subset:100", "N must be >= 257"),
])
def test_the_vocabulary_is_checked_before_any_work(recipe, tmp_path, capsys, override, words):
    run_dir = tmp_path / "run"
    err = fails(capsys, ["run", str(recipe), "--run-dir", str(run_dir), override])
    assert words in err, err
    assert not run_dir.exists()


# ------------------------------------------------------------------------------------- a whole run
@pytest.fixture(scope="module")
def subset_run(recipe, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "subset"
    assert main(["run", str(recipe), "--run-dir", str(run_dir)]) == 0
    return run_dir


def test_a_ce_only_subset_student_is_prepared_trained_exported_and_scored(subset_run, tiny_teacher_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from teachers.data import TokenDataset

    prepared = TokenDataset(subset_run / "prepare" / "dataset")
    assert prepared.meta["vocab"] == "subset:290" and prepared.meta["vocab_size"] == 290
    assert prepared.teacher_view(0).ids.numel() > 0
    model_dir = subset_run / "export" / "model"
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    saved = json.loads((subset_run / "prepare" / "tokenizer" / "tokenizer.json").read_text())
    assert len(tokenizer) == 290 and json.loads(tokenizer.backend_tokenizer.to_str())["model"] == saved["model"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=True)  # no spikedistill needed
    assert model.config.vocab_size == 290 and model.config.eos_token_id == tokenizer.eos_token_id
    ids = tokenizer("It is a truth", return_tensors="pt").input_ids
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, ids.shape[1] + 4)
    results = json.loads((subset_run / "evaluate" / "results.json").read_text())
    student, teacher = results["student"]["bpb"]["persuasion"], results["teacher"]["bpb"]["persuasion"]
    assert student["bytes"] == teacher["bytes"] and student["tokens"] > teacher["tokens"]
    assert 0 < student["bits_per_byte"] < 20


def test_bpb_generate_and_leaderboard_read_the_subset_student(subset_run, capsys):
    model_dir = subset_run / "export" / "model"
    assert main(["bpb", str(model_dir), "persuasion", "--max-bytes", "600"]) == 0
    assert "persuasion:" in capsys.readouterr().out
    assert main(["generate", str(model_dir), "--prompt", "It is", "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.startswith("It is")
    assert main(["leaderboard", str(subset_run.parent)]) == 0
    assert "subset" in capsys.readouterr().out


def test_the_matched_llama_baseline_takes_the_derived_vocabulary(recipe, tmp_path):
    from transformers import AutoConfig

    run_dir = tmp_path / "llama"
    assert main(["run", str(recipe), "--run-dir", str(run_dir), "--stages", "prepare,distill", "student.arch=llama",
                 "student.init_from_teacher=false"]) == 0
    config = AutoConfig.from_pretrained(run_dir / "distill" / "student")
    assert config.model_type == "llama" and config.vocab_size == 290
