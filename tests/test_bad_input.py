"""Bad input (issue 7): each case is one error line naming the file or key and the fix, exit code 2, no
traceback unless --debug, and no done.json for anything that did not finish.

Cases run the real CLI entry point (pipeline.cli.main) in-process on the tiny recipe of
tests/fault_scripts/common.py; test_exit_code_and_debug_in_a_real_process checks the same contract on the
`python -m pipeline` process itself.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fault_scripts"))
from common import ROOT, write_recipe

pytestmark = pytest.mark.faults


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_teacher_dir) -> Path:
    return write_recipe(tmp_path_factory.mktemp("recipe"), tiny_teacher_dir)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_teacher_dir) -> Path:
    """Bad inputs on disk: corpora, a non-causal-LM teacher, a teacher without weights, a corrupt GGUF."""
    from transformers import BertConfig, BertModel

    d = tmp_path_factory.mktemp("bad")
    (d / "empty.txt").write_text("")
    (d / "latin1.txt").write_bytes("caf\xe9 cr\xe8me br\xfbl\xe9e, ".encode("latin-1") * 40)
    (d / "short.txt").write_text("Too short.")
    (d / "corrupt.gguf").write_bytes(b"this is not a GGUF file" * 10)
    (d / "not_a_model").mkdir()
    (d / "not_a_model" / "notes.txt").write_text("no config.json here")
    bert = d / "bert"
    BertModel(BertConfig(vocab_size=320, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(bert)
    no_weights = d / "no_weights"
    no_weights.mkdir()
    for f in tiny_teacher_dir.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, no_weights / f.name)
        if f.name.startswith(("tokenizer", "special")):
            shutil.copy(f, bert / f.name)
    return d


@pytest.fixture(scope="module")
def cached_run(recipe, tmp_path_factory) -> Path:
    """A run directory with prepare, teacher_cache and align done (distill reads the cache)."""
    from pipeline.cli import main

    run_dir = tmp_path_factory.mktemp("cached") / "run"
    assert main(["run", str(recipe), "--run-dir", str(run_dir), "--stages", "prepare,teacher_cache,align"]) == 0
    return run_dir


def fails(capsys, argv: list[str]) -> str:
    """Run the CLI; it must exit 2 with exactly one error line and no traceback -> that line."""
    from pipeline.cli import main

    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = re.findall(r"spikedistill: error: [^\r\n]*", err)
    assert code == 2, err[-2000:]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def done_files(run_dir: Path) -> set[Path]:
    return set(run_dir.rglob("done.json")) if run_dir.exists() else set()


# (case id, overrides or argv builder, --stages, words the error line must contain)
RECIPE_CASES = [
    ("unknown_key", ["distill.bogus=1"], "prepare", ["distill.bogus"]),
    ("unknown_section", ["trainer.steps=1"], "prepare", ["trainer"]),
    ("wrong_type", ["distill.train.steps=ten"], "prepare", ["distill.train.steps"]),
    ("negative_lr", ["distill.train.optim.lr=-0.1"], "prepare", ["distill.train.optim.lr", "> 0"]),
    ("zero_lr", ["align.train.optim.lr=0"], "prepare", ["align.train.optim.lr"]),
    ("zero_batch_size", ["align.train.batch_size=0"], "prepare", ["align.train.batch_size"]),
    ("zero_steps", ["distill.train.steps=0"], "prepare", ["distill.train.steps"]),
    ("bad_override_syntax", ["distill.train.steps"], "prepare", ["distill.train.steps", "key=value"]),
    ("bad_choice", ["distill.kd.kind=kl"], "prepare", ["distill.kd.kind"]),
    ("unknown_stage", [], "prepare,polish", ["--stages", "polish"]),
]


@pytest.mark.parametrize("case, overrides, stages, words", RECIPE_CASES, ids=[c[0] for c in RECIPE_CASES])
def test_recipe_errors(capsys, recipe, tmp_path, case, overrides, stages, words):
    run_dir = tmp_path / "run"
    err = fails(capsys, ["run", str(recipe), *overrides, "--run-dir", str(run_dir), "--stages", stages])
    assert all(w in err for w in words), err
    assert not run_dir.exists()  # a bad recipe is refused before anything is written


def test_bad_override_syntax_after_the_options(capsys, recipe, tmp_path):
    err = fails(capsys, ["run", str(recipe), "--run-dir", str(tmp_path / "run"), "distill.train.steps"])
    assert "distill.train.steps" in err and "key=value" in err


def test_missing_recipe_file(capsys, tmp_path):
    err = fails(capsys, ["run", str(tmp_path / "nope.yaml")])
    assert "nope.yaml: recipe file not found" in err


def test_recipe_that_is_not_yaml(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: {name: [unclosed\n  - : :\n")
    err = fails(capsys, ["run", str(bad)])
    assert "bad.yaml" in err and "YAML" in err


def test_recipe_that_is_yaml_but_not_a_mapping(capsys, tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- just\n- a list\n")
    assert "list.yaml" in fails(capsys, ["run", str(bad)])


# input cases that get as far as a stage: (id, overrides(files), stages, words)
STAGE_CASES = [
    ("teacher_path_missing", lambda f: ["teacher.spec=/nonexistent/teacher"], "prepare",
     ["/nonexistent/teacher", "does not exist"]),
    ("teacher_not_causal_lm", lambda f: [f"teacher.spec={f / 'bert'}"], "prepare,teacher_cache",
     ["bert", "not supported as a teacher"]),
    ("teacher_without_weights", lambda f: [f"teacher.spec={f / 'no_weights'}"], "prepare,teacher_cache",
     ["no_weights", "weights"]),
    ("teacher_gguf_corrupt", lambda f: [f"teacher.spec={f / 'corrupt.gguf'}"], "prepare",
     ["corrupt.gguf", "not a GGUF file"]),
    ("student_vocab_differs", lambda f: ["student.config.vocab_size=100"], "prepare,align",
     ["student.config.vocab_size", "teacher"]),
    ("seq_len_over_teacher_max", lambda f: ["data.seq_len=512"], "prepare,align",
     ["512", "max_length 256", "data.seq_len"]),
    ("seq_len_over_student_max", lambda f: ["student.config.max_position=8"], "prepare,align",
     ["max_position", "data.seq_len"]),
    ("corpus_empty", lambda f: [f"data.sources=[{f / 'empty.txt'}]"], "prepare", ["empty.txt", "empty"]),
    ("corpus_not_utf8", lambda f: [f"data.sources=[{f / 'latin1.txt'}]"], "prepare",
     ["latin1.txt", "not UTF-8", "iconv"]),
    ("corpus_shorter_than_a_sequence", lambda f: [f"data.sources=[{f / 'short.txt'}]"], "prepare",
     ["short.txt", "fewer than one sequence", "data.seq_len"]),
    ("corpus_missing", lambda f: [f"data.sources=[{f / 'absent.txt'}]"], "prepare", ["absent.txt", "not found"]),
    ("stage_input_not_run", lambda f: [], "distill", ["needs stage prepare", "--stages"]),
]


@pytest.mark.parametrize("case, overrides, stages, words", STAGE_CASES, ids=[c[0] for c in STAGE_CASES])
def test_input_errors(capsys, recipe, files, tmp_path, case, overrides, stages, words):
    run_dir = tmp_path / "run"
    err = fails(capsys, ["run", str(recipe), "--run-dir", str(run_dir), "--stages", stages, *overrides(files)])
    assert all(w in err for w in words), err
    failed = stages.split(",")[-1]
    assert not (run_dir / failed / "done.json").exists()
    assert not (run_dir / "lock").exists()


# refused before any stage runs (pre-flight): (id, overrides, stages, words); nothing may be written
PREFLIGHT_CASES = [
    # the tiny teacher is 32 wide: weight inheritance cannot give a 64-wide student its embedding
    ("teacher_narrower_than_student", ["student.init_from_teacher=true", "student.config.d_model=64"],
     "prepare,align", ["student.init_from_teacher", "d_model=64", "embedding width 32",
                       "student.config.d_model to 32 or less"]),
    ("deepspeed_without_a_launcher", ["distributed.strategy=deepspeed",
                                      f"distributed.deepspeed_config={ROOT / 'recipes/deepspeed/zero2.json'}"],
     "prepare,distill", ["distributed.strategy=deepspeed needs a launcher", "accelerate launch", "torchrun",
                         "distributed.strategy=auto"]),
]


@pytest.mark.parametrize("case, overrides, stages, words", PREFLIGHT_CASES, ids=[c[0] for c in PREFLIGHT_CASES])
def test_refused_before_any_stage_runs(capsys, recipe, tmp_path, monkeypatch, case, overrides, stages, words):
    for name in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    run_dir = tmp_path / "run"
    err = fails(capsys, ["run", str(recipe), "--run-dir", str(run_dir), "--stages", stages, *overrides])
    assert all(w in err for w in words), err
    assert not run_dir.exists()  # prepare did not run first


def test_a_batch_that_will_not_fit_names_the_batch_size_to_lower(capsys, recipe, tmp_path, monkeypatch):
    from pipeline.memory import ENV_AVAILABLE, estimate_stage, gb
    from pipeline.recipe import load_recipe
    from teachers import describe_teacher

    r = load_recipe(recipe, ["align.train.batch_size=8"])
    est = estimate_stage(r, "align", describe_teacher(r.teacher.spec))
    limit = int((est.total(2) + est.total(3)) / 2)  # room for 2 rows, not 3
    # brute force over every smaller batch: the largest that fits is the one to name
    expected = max(b for b in range(1, 8) if est.total(b) <= limit)
    monkeypatch.setenv(ENV_AVAILABLE, str(limit))
    run_dir = tmp_path / "run"
    err = fails(capsys, ["run", str(recipe), "--run-dir", str(run_dir), "--stages", "prepare,align",
                         "align.train.batch_size=8"])
    assert expected == 2 and f"lower align.train.batch_size to {expected} or less" in err, err
    assert f"estimated peak memory {gb(est.total())}" in err and f"{gb(limit)} available ({ENV_AVAILABLE})" in err
    assert "align.train.grad_accum" in err and not run_dir.exists()
    monkeypatch.setenv(ENV_AVAILABLE, str(int((est.total(7) + est.total(8)) / 2)))  # one row too many
    err = fails(capsys, ["run", str(recipe), "--run-dir", str(run_dir), "--stages", "prepare,align",
                         "align.train.batch_size=8"])
    assert "lower align.train.batch_size to 7 or less" in err, err
    monkeypatch.setenv(ENV_AVAILABLE, "1k")
    err = fails(capsys, ["run", str(recipe), "--run-dir", str(run_dir), "--stages", "prepare,teacher_cache"])
    assert "teacher_cache: estimated peak memory" in err and "even a batch of 1 does not fit" in err


def _corrupt_shard(cache: Path) -> None:
    shard = cache / "shard_00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF  # a flipped bit in the tensor bytes: same size, wrong checksum
    shard.write_bytes(bytes(data))


def _other_k(cache: Path) -> None:
    manifest = cache / "manifest.json"
    meta = json.loads(manifest.read_text())
    meta["key"]["k"] = meta["key"]["k"] * 2
    manifest.write_text(json.dumps(meta))


def _other_tokenizer(cache: Path) -> None:
    manifest = cache / "manifest.json"
    meta = json.loads(manifest.read_text())
    meta["key"]["tokenizer_hash"] = "0" * 16
    manifest.write_text(json.dumps(meta))


def _other_teacher(cache: Path) -> None:
    manifest = cache / "manifest.json"
    meta = json.loads(manifest.read_text())
    meta["key"]["teacher_fingerprint"] = "0" * 64
    manifest.write_text(json.dumps(meta))


def _other_temperature(cache: Path) -> None:
    manifest = cache / "manifest.json"
    meta = json.loads(manifest.read_text())
    meta["key"]["temperature"] = 1.0  # the recipe distills at the default tau 2
    manifest.write_text(json.dumps(meta))


def _previous_format(cache: Path) -> None:
    manifest = cache / "manifest.json"
    meta = json.loads(manifest.read_text())
    meta["key"]["format"] = 1
    manifest.write_text(json.dumps(meta))


@pytest.mark.parametrize("spoil, words", [
    (_corrupt_shard, ["shard_00000", "checksum", "rerun"]),
    (_other_k, ["other inputs", "k=8 (expected 4)", "rebuild"]),
    (_other_tokenizer, ["other inputs", "tokenizer_hash"]),
    (_other_teacher, ["other inputs", "teacher_fingerprint"]),
    (_other_temperature, ["other inputs", "temperature=1.0 (expected 2.0)", "rebuild"]),
    (_previous_format, ["format 1", "delete", "rebuild"]),
], ids=["corrupt_shard", "manifest_other_k", "manifest_other_tokenizer", "manifest_other_teacher",
        "manifest_other_temperature", "manifest_previous_format"])
def test_cache_errors(capsys, recipe, cached_run, spoil, words):
    cache = cached_run / "teacher_cache" / "cache"
    saved = {p: p.read_bytes() for p in cache.iterdir() if p.is_file()}
    spoil(cache)
    try:
        err = fails(capsys, ["run", str(recipe), "--run-dir", str(cached_run), "--stages", "distill"])
    finally:
        for p, data in saved.items():
            p.write_bytes(data)
    assert all(w in err for w in words), err
    assert not (cached_run / "distill" / "done.json").exists()


def test_shared_cache_built_at_another_temperature_is_refused(capsys, recipe, tmp_path):
    # a study shares one cache between arms (teacher_cache.dir): an arm at tau 1 must not read the tau-2 one
    from pipeline.cli import main

    shared = f"teacher_cache.dir={tmp_path / 'shared'}"
    assert main(["run", str(recipe), "--run-dir", str(tmp_path / "a"), "--stages", "prepare,teacher_cache",
                 shared, "distill.kd.temperature=2"]) == 0
    err = fails(capsys, ["run", str(recipe), "--run-dir", str(tmp_path / "b"), "--stages",
                         "prepare,teacher_cache", shared, "distill.kd.temperature=1"])
    assert "shared" in err and "temperature=2.0 (expected 1.0)" in err, err
    assert not (tmp_path / "b" / "teacher_cache" / "done.json").exists()


def test_existing_run_dir_with_another_config(capsys, recipe, cached_run):
    before = {p: p.read_bytes() for p in done_files(cached_run)}
    err = fails(capsys, ["run", str(recipe), "--run-dir", str(cached_run), "--stages", "prepare",
                         "data.seq_len=8"])
    assert "config.yaml" in err and "data.seq_len" in err and "--resume" in err and "--force" in err
    assert {p: p.read_bytes() for p in done_files(cached_run)} == before


def test_binary_config_yaml_in_the_run_dir(capsys, recipe, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_bytes(bytes(range(256)))
    err = fails(capsys, ["run", str(recipe), "--run-dir", str(run_dir), "--stages", "prepare"])
    assert "config.yaml" in err and "--resume" in err  # unreadable: treated as a different config


@pytest.mark.parametrize("where", ["under_a_file", "permission_denied"])
def test_run_dir_not_writable(capsys, recipe, tmp_path, monkeypatch, where):
    if where == "under_a_file":
        (tmp_path / "afile").write_text("x")
        run_dir = tmp_path / "afile" / "run"
    else:  # tests run as root here, so a chmod cannot deny a write: the OS error is simulated
        run_dir = tmp_path / "ro" / "run"
        real_mkdir = Path.mkdir

        def deny(self, *a, **kw):
            if self == run_dir:
                raise PermissionError(13, "Permission denied", str(self))
            return real_mkdir(self, *a, **kw)

        monkeypatch.setattr(Path, "mkdir", deny)
    err = fails(capsys, ["run", str(recipe), "--run-dir", str(run_dir), "--stages", "prepare"])
    assert str(run_dir) in err and "--run-dir" in err


def test_eval_of_a_directory_that_is_not_a_model(capsys, files):
    err = fails(capsys, ["eval", str(files / "not_a_model")])
    assert "not_a_model" in err and "not a model directory" in err


def test_exit_code_and_debug_in_a_real_process(recipe, tmp_path):
    args = [sys.executable, "-m", "pipeline", "run", str(recipe), "--run-dir", str(tmp_path / "r"),
            "distill.train.optim.lr=-1"]
    plain = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=False)
    assert plain.returncode == 2
    assert plain.stderr.strip().count("\n") == 0 and "Traceback" not in plain.stderr
    assert plain.stderr.startswith("spikedistill: error: distill.train.optim.lr:")
    debug = subprocess.run(args + ["--debug"], cwd=ROOT, capture_output=True, text=True, check=False)
    assert debug.returncode != 0 and "Traceback (most recent call last)" in debug.stderr
    assert "ConfigError: distill.train.optim.lr" in debug.stderr


def test_weight_inheritance_that_will_not_fit_names_init_from_teacher(monkeypatch):
    """When the set-up peak of weight inheritance (float64 copies of the teacher's embedding matrix) is what
    exceeds the memory, no batch size helps: the line names student.init_from_teacher, not a batch size (the
    README's demo on a 2 GB box: 1.5 GB of training state, a 2.3 GB set-up)."""
    from pipeline import memory
    from pipeline.errors import ConfigError

    est = memory.Estimate("align", "align.train.batch_size", 4, {"baseline": 0.6e9, "teacher weights": 0.5e9},
                          {"activations": 0.1e9}, setup=2.3e9)
    monkeypatch.setattr(memory, "estimate_stage", lambda recipe, stage, shape, world=1: est)
    monkeypatch.setenv(memory.ENV_AVAILABLE, "2G")
    with pytest.raises(ConfigError) as exc:
        memory.check_memory(None, ["align"], None)
    err = str(exc.value)
    assert "\n" not in err and "estimated peak memory 2.3 GB" in err and "student.init_from_teacher=false" in err
    assert "batch_size" not in err, err
    monkeypatch.setenv(memory.ENV_AVAILABLE, "1.5G")  # the training peak (1.5 GB at 4 rows) no longer fits either:
    with pytest.raises(ConfigError) as exc:  # the set-up is still what no batch size can fix
        memory.check_memory(None, ["align"], None)
    assert "student.init_from_teacher=false" in str(exc.value)
    monkeypatch.setenv(memory.ENV_AVAILABLE, "2.4G")  # the set-up fits, 4 rows (1.5 GB) fit: no refusal
    assert memory.check_memory(None, ["align"], None) == [est]
