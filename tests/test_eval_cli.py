"""The eval subcommands (generate streams, seeds reproduce, energy/eval/bpb write their files, errors are one
line with exit code 2) and the sampling rules of eval.generate."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from eval.cli import main, register
from eval.generate import sample_next, stream_text
from eval.testing import (
    save_model_dir,
    tiny_student,
)


@pytest.fixture(scope="module")
def student(tiny_tokenizer):
    return tiny_student(len(tiny_tokenizer), seed=6)


@pytest.fixture(scope="module")
def student_dir(student, tiny_tokenizer, tmp_path_factory):
    return save_model_dir(student, tiny_tokenizer, tmp_path_factory.mktemp("cli_student"))


def test_register_adds_subcommands():
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    for argv in (
        ["eval", "M", "--tasks", "a,b", "--teacher", "T", "--limit", "3"],
        ["generate", "M", "--prompt", "p", "--top-p", "0.9", "--seed", "1"],
        ["energy", "M", "--teacher", "T", "--context", "64", "--json", "f.json"],
        ["leaderboard", "runs"],
        ["bpb", "M", "hamlet"],
    ):
        args = parser.parse_args(argv)
        assert callable(args.func)


def test_stream_text_streams_the_greedy_continuation(student, tiny_tokenizer):
    prompt = "It is a truth"
    pieces = list(stream_text(student, tiny_tokenizer, prompt, max_new_tokens=10))
    ids = tiny_tokenizer.encode(prompt)
    own = student.generate(torch.tensor([ids]), max_new_tokens=10, eos_token_id=0)[0, len(ids) :].tolist()
    assert len(pieces) > 1  # text arrives piece by piece, not at the end
    assert "".join(pieces) == tiny_tokenizer.decode(own, skip_special_tokens=True)


def test_sampling_seed_top_k_top_p(student, tiny_tokenizer):
    def run(**kw):
        return "".join(stream_text(student, tiny_tokenizer, "To be", 8, **kw))

    assert run(temperature=1.0, seed=3) == run(temperature=1.0, seed=3)
    assert run(temperature=1.0, top_k=1, seed=3) == run()  # top-k 1 is greedy
    assert run(temperature=1.0, top_p=1e-6, seed=4) == run()  # top-p keeps at least the top token
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0]])
    gen = torch.Generator().manual_seed(0)
    picks = {int(sample_next(logits, 1.0, top_k=2, generator=gen)) for _ in range(50)}
    assert picks <= {2, 3} and len(picks) == 2


def test_generate_command_prints_prompt_and_continuation(student_dir, capsys):
    assert main(["generate", str(student_dir), "--prompt", "It is a truth", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("It is a truth")


def test_energy_and_bpb_commands(student_dir, tiny_teacher_dir, tmp_path, capsys):
    out = tmp_path / "energy.json"
    assert (
        main(
            [
                "energy",
                str(student_dir),
                "--teacher",
                str(tiny_teacher_dir),
                "--context",
                "32",
                "--text",
                "hamlet",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    report = json.loads(out.read_text())
    assert report["ratio"]["energy_student_over_teacher"] > 0 and report["rate_probe_tokens"] > 0
    text = tmp_path / "t.txt"
    text.write_text("Who's there? Nay, answer me: stand, and unfold yourself.")
    assert main(["bpb", str(student_dir), str(text), "--context", "16"]) == 0
    assert "bits/byte" in capsys.readouterr().out


def test_eval_command_writes_json_and_markdown(student_dir, tmp_path):
    assert (
        main(
            [
                "eval",
                str(student_dir),
                "--tasks",
                "spikedistill_hamlet_next_line",
                "--limit",
                "2",
                "--output",
                str(tmp_path),
            ]
        )
        == 0
    )
    raw = json.loads((tmp_path / "lm_eval_student.json").read_text())
    assert "acc,none" in raw["results"]["spikedistill_hamlet_next_line"]
    assert "spikedistill_hamlet_next_line" in (tmp_path / "results.md").read_text()


def test_errors_are_one_line_exit_2(tmp_path, capsys):
    assert main(["energy", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no config.json" in err and str(tmp_path) in err
    assert main(["eval", str(tmp_path), "--tasks", "spikedistill_offline"]) == 2
    assert "no config.json" in capsys.readouterr().err
