"""A new user's path (issue 17): own data, a run that ends with what to do next, Ctrl-C and "train longer",
errors that name the fix, and quiet third-party libraries.

Everything goes through the real CLI: `python -m pipeline` processes where the output or the exit matters
(summary, noise, Ctrl-C), pipeline.cli.main in-process otherwise. The recipe is the tiny one of
tests/fault_scripts/common.py (a tiny random Llama teacher, 2 align + 6 distill steps).
"""

from __future__ import annotations

import dataclasses
import json
import lzma
import math
import os
import re
import shlex
import subprocess
import sys
import typing
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "fault_scripts"))
from common import ROOT, STAGES, TEXT, cli, write_recipe

from pipeline.cli import main
from pipeline.schema import Recipe

pytestmark = pytest.mark.faults  # docs/reliability.md cites these tests; `make faults` runs them

EVAL = ["evaluate.texts=persuasion", "evaluate.max_text_bytes=600", "evaluate.context_length=64",
        "evaluate.energy=true", "evaluate.teacher=true", "evaluate.tasks=spikedistill_persuasion_cloze",
        "evaluate.limit=2", "evaluate.sample_tokens=2", "evaluate.sample_repetition_penalty=1.3"]


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, tiny_teacher_dir) -> Path:
    return write_recipe(tmp_path_factory.mktemp("recipe"), tiny_teacher_dir)


def spikedistill(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """`spikedistill ARGS` as a user runs it: a new process, in `cwd`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)


def fails(capsys, argv: list[str]) -> str:
    """main(argv) must exit 2 with one error line -> that line."""
    capsys.readouterr()
    code = main(argv)
    err = capsys.readouterr().err
    lines = re.findall(r"spikedistill: error: [^\r\n]*", err)
    assert code == 2 and len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


def after_program(argv: list[str]) -> list[str]:
    """The words of a printed command after its program (`spikedistill`, a path to it, or `python -m pipeline`)."""
    for i, word in enumerate(argv):
        if Path(word).name == "spikedistill" or (word == "pipeline" and argv[i - 1] == "-m"):
            return argv[i + 1:]
    raise AssertionError(f"no spikedistill program in {argv}")


def done(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "done.json").read_text())


# ------------------------------------------------------------------------------- a whole run, as a user
@pytest.fixture(scope="module")
def full_run(recipe, tmp_path_factory):
    """Every stage of the tiny recipe in one `python -m pipeline run`, from a fresh working directory."""
    cwd = tmp_path_factory.mktemp("user")
    proc = spikedistill(["run", str(recipe), "--run-dir", "runs/tiny", *EVAL], cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return cwd, cwd / "runs" / "tiny", proc


def test_the_end_of_a_run_says_what_it_made_and_what_to_run_next(full_run, monkeypatch):
    cwd, run_dir, proc = full_run
    out = proc.stdout
    distill = done(run_dir, "distill")["metrics"]
    # tokens_seen over the whole stage (not the last step's count) and the validation bits/byte
    assert distill["tokens_seen"] == 6 * 2 * 15  # 6 steps x batch 2 x 15 next-token targets per 16-token row
    assert f"trained: {distill['tokens_seen']:,.0f} tokens seen in distill" in out
    assert f"validation {distill['val_bits_per_byte']:.3f} bits/byte after 6 steps" in out
    shown = dict(re.findall(r"^  (model|results|energy|run) +(\S+)", out, flags=re.MULTILINE))
    assert (cwd / shown["model"]).resolve() == Path(done(run_dir, "export")["outputs"]["model"])
    assert (cwd / shown["results"]).resolve() == run_dir / "evaluate" / "results.json"
    assert (cwd / shown["energy"]).is_file() and (cwd / shown["run"] / "config.yaml").is_file()
    commands = [after_program(shlex.split(line)) for line in out.split("next:\n", 1)[1].splitlines() if line.strip()]
    by_name = {c[0]: c for c in commands}
    assert set(by_name) == {"generate", "eval", "leaderboard", "run"}
    assert by_name["eval"][by_name["eval"].index("--teacher") + 1] == str(Path(done(run_dir, "prepare")["config"]
                                                                                ["teacher.spec"]))
    assert "--extend" in by_name["run"] and "distill.train.steps=12" in by_name["run"]
    # generate decodes as the evaluate stage's sample did: with the recipe's repetition penalty
    assert by_name["generate"][-2:] == ["--repetition-penalty", "1.3"]
    monkeypatch.chdir(cwd)  # the printed commands run as printed, from where the run was started
    for name in ("generate", "leaderboard"):
        assert main(by_name[name] + (["--max-new-tokens", "2"] if name == "generate" else [])) == 0, name
    assert (run_dir.parent / "leaderboard" / "leaderboard.md").is_file()


def test_printed_commands_run_as_printed_without_an_activated_venv(full_run, recipe):
    """`make demo` runs .venv/bin/spikedistill with the venv not on PATH: the printed commands must name the
    executable by its path then (and by its name when PATH finds it: an activated venv), and run as printed."""
    cwd, _, _ = full_run
    script = Path(sys.executable).with_name("spikedistill")
    bare = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                           if p and Path(p).resolve() != script.parent.resolve())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PATH": bare,
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    printed = {}
    for path, first in ((bare, str(script)), (f"{script.parent}{os.pathsep}{bare}", "spikedistill")):
        proc = subprocess.run([str(script), "run", str(recipe), "--run-dir", "runs/tiny", *EVAL], cwd=cwd,
                              env={**env, "PATH": path}, capture_output=True, text=True, timeout=300, check=False)
        assert proc.returncode == 0, proc.stderr[-2000:]
        printed[first] = [shlex.split(x) for x in proc.stdout.split("next:\n", 1)[1].splitlines() if x.strip()]
        assert {c[0] for c in printed[first]} == {first}, printed[first]
    generate = next(c for c in printed[str(script)] if c[1] == "generate")
    as_printed = subprocess.run([*generate, "--max-new-tokens", "2"], cwd=cwd, env=env, capture_output=True,
                                text=True, timeout=300, check=False)
    assert as_printed.returncode == 0, as_printed.stderr[-2000:]


def test_third_party_noise_is_silenced_and_our_own_lines_are_not(full_run):
    _, _, proc = full_run
    both = proc.stdout + proc.stderr
    assert "Setting accelerator to CPU" not in both  # DeepSpeed, imported by accelerate
    assert "--metadata" not in both  # lm-eval, once per local task
    assert "Setting verbosity through simple_evaluate" not in both
    assert "[distill] running (not run yet)" in proc.stderr and "layer map (student -> teacher" in proc.stderr


def test_the_noise_filters_drop_only_the_listed_lines():
    import logging

    from eval.cli import DropLogLines

    f = DropLogLines("Setting accelerator to CPU")

    def record(msg):
        return logging.LogRecord("DeepSpeed", logging.WARNING, __file__, 1, msg, None, None)

    assert not f.filter(record("Setting accelerator to CPU. If you have GPU ..."))
    assert f.filter(record("ZeRO stage 2: optimizer state partitioned"))


def test_a_run_directory_given_as_a_model_names_its_exported_model(full_run, capsys):
    _, run_dir, _ = full_run
    model = run_dir / "export" / "model"
    for argv in (["generate", str(run_dir), "--prompt", "x"], ["eval", str(run_dir)], ["bpb", str(run_dir), "hamlet"],
                 ["energy", str(run_dir)], ["generate", str(run_dir / "export"), "--prompt", "x"]):
        err = fails(capsys, argv)
        assert f"its exported model is {model}" in err and "teacher.spec" not in err, err


def test_bpb_max_bytes_and_the_bar_names_the_text(full_run, capsys):
    _, run_dir, _ = full_run
    assert main(["bpb", str(run_dir / "export" / "model"), "persuasion", "--max-bytes", "3000"]) == 0
    captured = capsys.readouterr()
    # independent count: whole lines of the bundled text while they fit in 3000 bytes
    with lzma.open(ROOT / "teachers" / "corpus" / "austen_eval_persuasion.txt.xz") as fh:
        text = fh.read().decode("utf-8")
    kept = 0
    for line in text.splitlines(keepends=True):
        if kept + len(line.encode("utf-8")) > 3000:
            break
        kept += len(line.encode("utf-8"))
    assert f"{kept:,} bytes of {len(text.encode('utf-8')):,}, cut at a line end" in captured.out
    assert "bpb persuasion" in captured.err  # the progress bar's name


def test_scoring_builds_no_autograd_graph(full_run):
    from eval.models import load_model_dir
    from eval.scoring import stream_logprobs

    model, _ = load_model_dir(full_run[1] / "export" / "model")
    logps, _ = stream_logprobs(model, list(range(1, 40)), chunk_size=16, progress="x")
    assert not logps.requires_grad


# ----------------------------------------------------------------------------------- Ctrl-C, wall time
def test_ctrl_c_says_what_was_saved_and_the_printed_command_resumes(recipe, tmp_path):
    from eval.leaderboard import training_info

    run_dir = tmp_path / "run"
    stopped = cli(["run", str(recipe), "--run-dir", str(run_dir), "--stages", STAGES], "int_step", 5)
    assert stopped.returncode == 130, stopped.stderr[-2000:]
    assert "interrupted: stage distill stopped; its last checkpoint is step 4 of 6" in stopped.stderr
    assert "finished stages are kept (prepare, teacher_cache, align)" in stopped.stderr
    command = re.search(r"^resume with: (.*)$", stopped.stderr, flags=re.MULTILINE).group(1)
    argv = shlex.split(command)
    assert Path(argv[0]).name == "spikedistill" and argv[1] == "run"
    assert main(argv[1:]) == 0
    assert [r["step"] for r in _train_rows(run_dir)] == [1, 2, 3, 4, 5, 6]  # resumed at 5, not from 1 again
    # the wall time counts both invocations of distill; the leaderboard sums every stage's
    attempts = [json.loads(x)["seconds"] for x in (run_dir / "distill" / "attempts.jsonl").read_text().splitlines()]
    d = done(run_dir, "distill")
    assert len(attempts) == 2 and d["wall_seconds"] == pytest.approx(sum(attempts), abs=2e-3)
    assert d["wall_seconds"] > d["seconds"]
    stages = [p.parent.name for p in run_dir.glob("*/done.json")]
    expected = sum(done(run_dir, s)["wall_seconds"] for s in stages)
    assert training_info(run_dir)["wall_seconds"] == pytest.approx(expected)


# ---------------------------------------------------------------------------------------- train longer
def _train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "distill" / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["split"] == "train"]


def _check_schedule(rows: list[dict], first: int, total: int, recipe_path: Path) -> None:
    from pipeline.recipe import load_recipe

    o = load_recipe(recipe_path).distill.train.optim
    for r in rows[first:]:  # the rate of a `total`-step schedule: warmup, then cosine (hand formula)
        s = r["step"] - 1
        warm = (s + 1) / o.warmup_steps if s < o.warmup_steps else None
        progress = min(1.0, (s - o.warmup_steps) / max(1, total - o.warmup_steps))
        cosine = o.min_lr + (o.lr - o.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
        assert r["lr"] == pytest.approx(o.lr * warm if warm is not None else cosine), r["step"]


def test_extend_continues_a_finished_run_from_its_last_checkpoint(recipe, tmp_path, capsys):
    run_dir = tmp_path / "run"
    base = ["run", str(recipe), "--run-dir", str(run_dir), "--stages", STAGES]
    assert main(base) == 0
    first = _train_rows(run_dir)
    err = fails(capsys, base + ["distill.train.steps=10"])
    assert "--extend to continue training from the last checkpoint" in err
    assert main(base + ["distill.train.steps=10", "--extend"]) == 0
    assert "--extend: continuing from step 6 to 10" in capsys.readouterr().out  # the summary's reason
    rows = _train_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 11))
    assert rows[:6] == first  # steps 1-6 are the first run's, not retrained
    assert rows[6]["tokens_seen"] == first[-1]["tokens_seen"] + rows[6]["tokens"]
    _check_schedule(rows, 6, 10, recipe)
    assert done(run_dir, "distill")["metrics"]["tokens_seen"] == 10 * 2 * 15

    # Ctrl-C during the first extended step (only the old run's checkpoints exist): the printed command resumes
    from pipeline.trainer import Trainer

    original = Trainer._train_step

    def ctrl_c_at_11(self):
        if self.step + 1 == 11:
            raise KeyboardInterrupt
        return original(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(Trainer, "_train_step", ctrl_c_at_11)
        assert main(base + ["distill.train.steps=14", "--extend"]) == 130
    err = capsys.readouterr().err
    assert "last checkpoint is step 10 of 14" in err
    command = shlex.split(re.search(r"^resume with: (.*)$", err, flags=re.MULTILINE).group(1))
    assert main(after_program(command)) == 0
    rows = _train_rows(run_dir)
    assert [r["step"] for r in rows] == list(range(1, 15))
    _check_schedule(rows, 10, 14, recipe)
    err = fails(capsys, base + ["distill.train.steps=12", "--extend"])
    assert "--extend: distill.train.steps went down from 14 to 12" in err


def test_without_extend_more_steps_retrain_from_step_0(recipe, tmp_path, capsys):
    run_dir = tmp_path / "run"
    base = ["run", str(recipe), "--run-dir", str(run_dir), "--stages", STAGES]
    assert main(base) == 0
    assert main(base + ["distill.train.steps=8", "--resume"]) == 0
    assert "distill.train.steps (from step 0; --extend continues from the last checkpoint instead)" in capsys.readouterr().out
    _check_schedule(_train_rows(run_dir), 0, 8, recipe)


# ------------------------------------------------------------------------------------------ own data
@pytest.fixture(scope="module")
def own_data(tmp_path_factory) -> dict[str, tuple[Path, int]]:
    """Each data format a user may have -> (path, number of documents in it)."""
    import datasets

    d = tmp_path_factory.mktemp("own")
    paras = [p.strip() for p in TEXT.split(". ") if p.strip()] * 2
    (d / "book.txt").write_text(TEXT, encoding="utf-8")
    with open(d / "notes.jsonl", "w", encoding="utf-8") as fh:
        fh.writelines(json.dumps({"body": p, "id": 1}) + "\n" for p in paras)
    ds = datasets.Dataset.from_dict({"text": paras, "n": list(range(len(paras)))})
    ds.save_to_disk(str(d / "saved"))
    datasets.DatasetDict({"train": ds.select(range(5)), "test": ds.select(range(2))}).save_to_disk(str(d / "split"))
    (d / "folder").mkdir()
    (d / "folder" / "a.txt").write_text(TEXT, encoding="utf-8")
    (d / "folder" / "b.txt").write_text(TEXT, encoding="utf-8")
    (d / "folder" / "config.json").write_text('{"not": "data"}')  # metadata next to the texts: skipped
    return {"txt": (d / "book.txt", 1), "jsonl": (d / "notes.jsonl", len(paras)),
            "save_to_disk": (d / "saved", len(paras)), "save_to_disk_dict": (d / "split", 5),
            "arrow": (next((d / "saved").glob("*.arrow")), len(paras)), "folder": (d / "folder", 2)}


@pytest.mark.parametrize("kind", ["txt", "jsonl", "save_to_disk", "save_to_disk_dict", "arrow", "folder"])
def test_own_data_in_every_documented_format(recipe, own_data, tmp_path, kind):
    path, documents = own_data[kind]
    field = ["data.text_field=body"] if kind == "jsonl" else []
    # a single path for the list key data.sources, as a user first types it
    argv = ["run", str(recipe), "--run-dir", str(tmp_path / "r"), "--stages", "prepare", f"data.sources={path}",
            *field]
    assert main(argv) == 0
    assert done(tmp_path / "r", "prepare")["metrics"]["documents"] == documents


def test_the_readme_recipe_for_own_data_runs(own_data, tiny_teacher_dir, tmp_path, monkeypatch):
    import shutil

    section = (ROOT / "README.md").read_text(encoding="utf-8").split("## Your own data", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```yaml\n(.*?)```", section, flags=re.DOTALL).group(1)
    assert block.startswith("base: recipes/demo.yaml") and len(block.strip().splitlines()) == 4
    (tmp_path / "recipes").mkdir()
    shutil.copy(ROOT / "recipes" / "demo.yaml", tmp_path / "recipes" / "demo.yaml")
    shutil.copy(own_data["jsonl"][0], tmp_path / "notes.jsonl")
    (tmp_path / "mine.yaml").write_text(block, encoding="utf-8")
    monkeypatch.chdir(tmp_path)  # data.sources paths are relative to the working directory
    assert main(["run", "mine.yaml", "--stages", "prepare", f"teacher.spec={tiny_teacher_dir}", "data.seq_len=16"]) == 0
    prepared = done(tmp_path / "runs" / "mine", "prepare")
    assert prepared["metrics"]["documents"] == own_data["jsonl"][1]
    assert prepared["config"]["data"]["text_field"] == "body"


@pytest.mark.parametrize("case", ["model_dir", "prepared", "run_dir", "empty", "only_subfolders",
                                  "dict_without_train", "wrong_text_field", "jsonl_field", "glob_no_match"])
def test_folders_and_fields_are_diagnosed_before_any_work(recipe, own_data, tiny_teacher_dir, tmp_path, capsys,
                                                          monkeypatch, case):
    import datasets

    from pipeline.stages import prepare

    saved = own_data["save_to_disk"][0]
    (tmp_path / "empty").mkdir()
    (tmp_path / "nested" / "inner").mkdir(parents=True)
    tiny = datasets.Dataset.from_dict({"text": ["a b c"]})
    datasets.DatasetDict({"test": tiny}).save_to_disk(str(tmp_path / "testonly"))
    prepared_run = tmp_path / "prev"
    assert main(["run", str(recipe), "--run-dir", str(prepared_run), "--stages", "prepare"]) == 0
    cases = {
        "model_dir": ([f"data.sources={tiny_teacher_dir}"], "a model directory"),
        "prepared": ([f"data.sources={prepared_run / 'prepare' / 'dataset'}"], "packed token rows"),
        "run_dir": ([f"data.sources={prepared_run}"], "a spikedistill run directory"),
        "empty": ([f"data.sources={tmp_path / 'empty'}"], "it is empty"),
        "only_subfolders": ([f"data.sources={tmp_path / 'nested'}"], "found: inner/; subfolders are not read"),
        "dict_without_train": ([f"data.sources={tmp_path / 'testonly'}"], "without a 'train' split (splits: test)"),
        "wrong_text_field": ([f"data.sources={saved}", "data.text_field=txt"],
                             "no field 'txt' (fields: text, n); did you mean data.text_field=text?"),
        "jsonl_field": ([f"data.sources={own_data['jsonl'][0]}"], "no field 'text' (fields: body, id)"),
        "glob_no_match": ([f"data.sources={tmp_path / 'nope-*.txt'}"], "the pattern matches no file"),
    }
    overrides, words = cases[case]
    monkeypatch.setattr(prepare, "load_tokenizer", lambda *a, **k: pytest.fail("the teacher was loaded"))
    run_dir = tmp_path / "run"
    err = fails(capsys, ["run", str(recipe), "--run-dir", str(run_dir), *overrides])
    assert words in err, err
    assert "dataset_info.json" not in err and not run_dir.exists()


def test_a_save_to_disk_folder_is_never_read_as_json_files(own_data, tiny_tokenizer, tmp_path):
    from teachers.data import prepare_corpus

    meta = prepare_corpus([own_data["save_to_disk"][0]], tiny_tokenizer, tmp_path / "p", seq_len=8)
    assert meta["sources"] == ["saved"] and meta["documents"] == own_data["save_to_disk"][1]


# ----------------------------------------------------------------------------------------- the recipe
def _keys(cls, prefix: str = ""):
    """(dotted key, annotation) of every field of the schema, sections included."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key, kind = prefix + f.name, hints[f.name]
        yield key, kind
        if dataclasses.is_dataclass(kind):
            yield from _keys(kind, key + ".")


def _is_list(kind) -> bool:
    return typing.get_origin(kind) is list


LIST_KEYS = {k: typing.get_args(kind)[0] for k, kind in _keys(Recipe) if _is_list(kind)}


def test_every_list_key_is_found():
    assert {"data.sources", "evaluate.texts", "evaluate.tasks", "distill.train.optim.betas"} <= set(LIST_KEYS)


@pytest.mark.parametrize("key", LIST_KEYS)
def test_a_single_item_for_a_list_key_is_a_one_element_list(key, capsys):
    from pipeline.errors import ConfigError
    from pipeline.recipe import load_recipe

    item = {float: "0.5", int: "3"}.get(LIST_KEYS[key], "persuasion")
    try:
        recipe = load_recipe(ROOT / "recipes" / "demo.yaml", [f"{key}={item}"])
    except ConfigError as exc:  # betas needs two numbers, lr_grid three rates, lr_keys known keys: value errors
        assert str(exc).startswith(f"{key}: must be ") and "ListConfig" not in str(exc)
        assert key in {"distill.train.optim.betas", "align.train.optim.betas", "study.lr_grid", "study.lr_keys"}
    else:
        node = recipe
        for part in key.split("."):
            node = getattr(node, part)
        assert node == [LIST_KEYS[key](item)]
    for bad in ("a,b", "{a: 1}"):
        err = fails(capsys, ["run", str(ROOT / "recipes" / "demo.yaml"), f"{key}={bad}"])
        assert f"{key}: a list" in err and f"write {key}=[a,b]" in err and "AnyNode" not in err


@pytest.mark.parametrize("key", [k for k, _ in _keys(Recipe)])
def test_a_misspelt_key_at_any_level_gets_a_suggestion(key, capsys):
    def misspelt(k: str) -> str:
        head, _, last = k.rpartition(".")
        return (head + "." if head else "") + (last[:-1] if len(last) >= 5 else last + last[-1])

    typo = misspelt(key)
    err = fails(capsys, ["run", str(ROOT / "recipes" / "demo.yaml"), f"{typo}=1"])
    assert f"{typo}: unknown key; did you mean " in err, err
    # the key itself, or a sibling the same typo came from (evaluate.sample_top_ is one letter from _k and _p)
    same = {k for k, _ in _keys(Recipe) if misspelt(k) == typo}
    assert err.split("did you mean ", 1)[1].split("?", 1)[0] in same, err


@pytest.mark.parametrize("override, words", [
    ("student.config.token_mixr=sfsa", "did you mean student.config.token_mixer?"),
    ("student.config.token_mixer=bogus", "student.config.token_mixer:"),
    ("student.config.vocab_size=100", "student.config.vocab_size: the vocabulary comes from the student's tokenizer"),
    ("student.preset=dmo", "did you mean demo?"),
    ("teacher.layer_map.9=1", "teacher.layer_map.9: the student has layers 0..0"),
    ("data.sources=bundled:austn", "did you mean bundled:austen?"),
    ("evaluate.texts=persuasoin", "did you mean persuasion?"),
    ("evaluate.tasks=spikedistill_mcc", "evaluate.tasks: unknown task(s) spikedistill_mcc; did you mean spikedistill_mc?"),
    ("teacher.spec=./smollm2-135", "did you mean the bundled alias 'smollm2-135m'?"),
    ("teacher.layer_map=3", "teacher.layer_map: a mapping of keys, got 3; set one key at a time"),
    ("data.seq_len=512", "data.seq_len=512 exceeds the teacher's max_length 256"),
    ("data=3", "data: a mapping of keys"),
])
def test_the_whole_recipe_is_checked_before_any_work(recipe, tmp_path, capsys, monkeypatch, override, words):
    import eval.harness
    from eval import EvalError
    from pipeline.stages import prepare

    def no_such_task(tasks):  # lm-eval's registry (indexing it takes seconds) does not know the name either
        raise EvalError(f"unknown lm-eval task(s) {tasks}")

    monkeypatch.setattr(eval.harness, "task_manager_for", no_such_task)
    monkeypatch.setattr(prepare, "load_tokenizer", lambda *a, **k: pytest.fail("the teacher was loaded"))
    run_dir = tmp_path / "run"
    err = fails(capsys, ["run", str(recipe), "--run-dir", str(run_dir), override])
    assert words in err, err
    assert not run_dir.exists()


def test_a_near_miss_of_a_bundled_alias_is_named(capsys):
    err = fails(capsys, ["bpb", "smollm2-135", "hamlet"])
    assert "did you mean the bundled alias 'smollm2-135m'?" in err
    err = fails(capsys, ["run", str(ROOT / "recipes" / "demo.yaml"), "--stages", "prepar"])
    assert "did you mean prepare?" in err


# ------------------------------------------------------------------------------------ bits/byte plot
def test_bpb_vs_energy_compares_the_same_texts(tmp_path):
    from eval.leaderboard import common_texts, plot_bpb_vs_energy

    def row(run, texts):
        return {"run": run, "role": "student", "label": run, "energy_pj": 1e3,
                "bits_per_byte": {t: b for t, (b, _) in texts.items()},
                "bpb_bytes": {t: n for t, (_, n) in texts.items()}}

    a = row("a", {"persuasion": (2.0, 20000), "hamlet": (4.0, 20000)})
    b = row("b", {"persuasion": (3.0, 20000)})
    c = row("c", {"persuasion": (2.5, 9000)})  # the same text, another length: not comparable
    assert common_texts([a, b]) == (["persuasion"], [a, b], [])
    texts, kept, left = common_texts([a, b, c])
    assert texts == ["persuasion"] and kept == [a, b] and left == [c]
    plot_bpb_vs_energy([a, b, c], tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 0
