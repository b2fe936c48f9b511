"""The `spikedistill` CLI: exit code 2 with one line on stderr for project errors, tracebacks with --debug."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import pipeline.runner as runner_mod
from pipeline.cli import build_parser, main
from pipeline.errors import ConfigError
from pipeline.stages import STAGE_ORDER, StageResult, register_stage

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "recipes" / "demo.yaml")


def _fails_with_one_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("spikedistill: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_missing_recipe(capsys, tmp_path):
    err = _fails_with_one_line(capsys, ["run", str(tmp_path / "missing.yaml")])
    assert "missing.yaml: recipe file not found" in err


def test_not_yaml(capsys, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: {name: [unclosed\n")
    assert "not valid YAML" in _fails_with_one_line(capsys, ["run", str(bad)])


@pytest.mark.parametrize("override, key", [
    ("distill.train.optim.lr=-1", "distill.train.optim.lr"),
    ("distill.train.batch_size=0", "distill.train.batch_size"),
    ("align.train.steps=0", "align.train.steps"),
    ("distill.bogus=1", "distill.bogus"),
    ("distill.train.steps=ten", "distill.train.steps"),
])
def test_bad_values_and_keys(capsys, override, key):
    assert f"error: {key}:" in _fails_with_one_line(capsys, ["run", DEMO, override])


def test_bad_override_syntax(capsys):
    assert "expected dotted.key=value" in _fails_with_one_line(capsys, ["run", DEMO, "distill.train.steps"])


def test_debug_shows_the_exception(tmp_path):
    with pytest.raises(ConfigError):
        main(["--debug", "run", str(tmp_path / "missing.yaml")])
    with pytest.raises(ConfigError):
        main(["run", str(tmp_path / "missing.yaml"), "--debug"])


def test_run_prints_the_summary(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(runner_mod, "make_accelerator", lambda recipe, train=None: None)

    def stub(ctx):
        out = ctx.stage_dir / "x"
        out.write_text("x")
        return StageResult(outputs={"x": str(out)}, metrics={"loss": 1.5})

    for name in STAGE_ORDER:
        register_stage(name, stub)
    try:
        argv = ["run", DEMO, "--run-dir", str(tmp_path / "r"), "--stages", "prepare,align"]
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert "prepare" in out and "align" in out and "loss=1.5" in out and "distill" not in out
        assert main(argv + ["distill.train.steps=3"]) == 2
        assert "--resume" in capsys.readouterr().err
        assert main(argv + ["distill.train.steps=3", "--resume"]) == 0
        assert "skipped" in capsys.readouterr().out
    finally:
        for name in STAGE_ORDER:
            register_stage(name, None)


def test_the_summary_labels_the_weighted_objective_and_shows_the_plain_ce():
    from pipeline.runner import StageSummary, format_summary

    text = format_summary([
        StageSummary("align", "ran", "not run yet", 1.0, {"val_loss": 0.7, "loss": 0.9}),
        StageSummary("distill", "ran", "not run yet", 1.0, {"val_bits_per_byte": 1.25, "val_loss": 3.1,
                                                            "val_ce": 2.5, "tokens_seen": 100}),
    ])
    align, distill = text.splitlines()[1:]
    assert "val_objective=0.7" in align and "objective=0.9" in align and "val_loss" not in align
    assert "val_bits_per_byte=1.25" in distill and "val_ce=2.5" in distill
    assert "val_loss" not in distill and "3.1" not in distill


def test_only_rank_0_prints_the_end_of_run_summary(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(runner_mod, "make_accelerator", lambda recipe, train=None: None)

    def stub(ctx):
        out = ctx.stage_dir / "x"
        if ctx.is_main:
            out.write_text("x")
        return StageResult(outputs={"x": str(out)}, metrics={"loss": 1.5})

    for name in STAGE_ORDER:
        register_stage(name, stub)
    try:
        argv = ["run", DEMO, "--run-dir", str(tmp_path / "r"), "--stages", "prepare"]
        assert main(argv) == 0
        assert "stage" in capsys.readouterr().out
        monkeypatch.setenv("RANK", "1")  # a second rank of the same run: skips, and says nothing on stdout
        assert main(argv) == 0
        assert capsys.readouterr().out == ""
    finally:
        for name in STAGE_ORDER:
            register_stage(name, None)


LAUNCHES = [  # (parent command line, this rank's argv, expected launcher words)
    (["/v/bin/python3", "/v/bin/accelerate", "launch", "--multi_gpu", "--num_processes", "2", "-m", "pipeline",
      "run", "r.yaml", "k=1"], ["/x/pipeline/__main__.py", "run", "r.yaml", "k=1"],
     ["/v/bin/accelerate", "launch", "--multi_gpu", "--num_processes", "2", "-m", "pipeline"]),
    (["/v/bin/python3", "/v/bin/torchrun", "--standalone", "--nproc_per_node", "2", "/v/bin/spikedistill", "run",
      "r.yaml"], ["/v/bin/spikedistill", "run", "r.yaml"],
     ["/v/bin/torchrun", "--standalone", "--nproc_per_node", "2", "/v/bin/spikedistill"]),
    (["/v/bin/python3", "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "pipeline", "run", "r.yaml"],
     ["/x/pipeline/__main__.py", "run", "r.yaml"],
     ["/v/bin/python3", "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "pipeline"]),
    (["bash"], ["/v/bin/spikedistill", "run", "r.yaml"], []),  # typed in a shell
    (["timeout", "60", "/v/bin/spikedistill", "run", "r.yaml"], ["/v/bin/spikedistill", "run", "r.yaml"], []),
    (["/v/bin/python3", "/v/bin/accelerate", "launch", "-m", "pipeline", "run", "other.yaml"],  # not our words
     ["/x/pipeline/__main__.py", "run", "r.yaml"], []),
]


@pytest.mark.parametrize("parent, argv, expected", LAUNCHES)
def test_the_launcher_is_read_from_the_parent_command_line(parent, argv, expected, monkeypatch):
    from pipeline import launch

    monkeypatch.setenv("PATH", "/nowhere")  # nothing on PATH: executables keep their paths
    assert launch.launcher_words(parent, argv) == expected


def test_an_executable_is_named_as_the_user_can_type_it(tmp_path, monkeypatch):
    from pipeline import launch

    exe = tmp_path / "bin" / "spikedistill"
    exe.parent.mkdir()
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", "/nowhere")
    assert launch.typed(str(exe)) == "bin/spikedistill"  # not on PATH: its path, from the working directory
    monkeypatch.setenv("PATH", str(exe.parent))
    assert launch.typed(str(exe)) == "spikedistill"  # an activated venv: its name
    other = tmp_path / "other" / "spikedistill"  # PATH finds a different one: keep the path
    other.parent.mkdir()
    other.write_text("#!/bin/sh\n")
    other.chmod(0o755)
    assert launch.typed(str(other)) == "other/spikedistill"


def test_missing_upstream_exits_2(capsys, tmp_path):
    err = _fails_with_one_line(capsys, ["run", DEMO, "--run-dir", str(tmp_path), "--stages", "export"])
    assert "needs stage prepare" in err


def test_subcommands_are_wired():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert {"run", "eval", "generate", "energy", "leaderboard"} <= set(sub.choices)


def test_module_entry_point_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline", "run", str(tmp_path / "nope.yaml")],
                          check=False, capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "nope.yaml" in proc.stderr


def test_teacher_error_exits_2(capsys, tmp_path):
    argv = ["run", DEMO, "--run-dir", str(tmp_path / "r"), "--stages", "prepare",
            f"teacher.spec={tmp_path / 'no-such-teacher'}"]
    err = _fails_with_one_line(capsys, argv)
    assert "no-such-teacher" in err
    assert not (tmp_path / "r" / "prepare" / "done.json").exists()


def test_data_error_exits_2_and_nothing_is_done(capsys, tmp_path, tiny_teacher_dir):
    argv = ["run", DEMO, "--run-dir", str(tmp_path / "r"), "--stages", "prepare",
            f"teacher.spec={tiny_teacher_dir}", f"data.sources=[{tmp_path / 'missing.txt'}]",
            "data.max_train_tokens=null"]
    err = _fails_with_one_line(capsys, argv)
    assert "missing.txt" in err
    assert not (tmp_path / "r" / "prepare" / "done.json").exists()


def test_prepare_with_a_tiny_teacher(capsys, tmp_path, tiny_teacher_dir):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("It is a truth universally acknowledged, that a single man.\n" * 40)
    argv = ["run", DEMO, "--run-dir", str(tmp_path / "r"), "--stages", "prepare", f"teacher.spec={tiny_teacher_dir}",
            f"data.sources=[{corpus}]", "data.seq_len=16", "data.max_train_tokens=320"]
    assert main(argv) == 0
    done = json.loads((tmp_path / "r" / "prepare" / "done.json").read_text())
    assert done["metrics"]["seq_len"] == 16 and Path(done["outputs"]["tokenizer"], "tokenizer.json").exists()
    from teachers.data import TokenDataset

    rows = TokenDataset(done["outputs"]["dataset"], "train")
    assert len(rows) > 0 and rows[0].shape == (16,)
    assert main(argv) == 0 and "skipped" in capsys.readouterr().out
