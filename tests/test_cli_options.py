"""Every numeric option of every `spikedistill` subcommand is range-checked: a value out of range (or not a
number) is one error line naming the option and the allowed range, exit 2, before anything runs."""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

import pytest

from eval.argtypes import float_range, int_range
from pipeline.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]

# subcommand, the arguments it needs besides the option, option, bad values, a good boundary value
CASES = [
    ("eval", ["M"], "--limit", ["0", "-2", "1.5"], "1"),
    ("eval", ["M"], "--batch-size", ["0", "x"], "1"),
    ("bpb", ["M", "hamlet"], "--context", ["0", "-1"], "1"),
    ("bpb", ["M", "hamlet"], "--batch-size", ["0"], "1"),
    ("bpb", ["M", "hamlet"], "--max-bytes", ["0", "-100", "1e3"], "1"),
    ("bpb", ["M", "hamlet"], "--stride", ["0", "-1", "1.5"], "1"),
    ("generate", ["M", "--prompt", "hi"], "--max-new-tokens", ["-5", "0", "ten"], "1"),
    ("generate", ["M", "--prompt", "hi"], "--temperature", ["-0.5", "nan", "inf"], "0"),
    ("generate", ["M", "--prompt", "hi"], "--top-k", ["-1", "2.5"], "0"),
    ("generate", ["M", "--prompt", "hi"], "--top-p", ["0", "1.5", "-0.1"], "1"),
    ("generate", ["M", "--prompt", "hi"], "--repetition-penalty", ["0", "-1", "x"], "1.3"),
    ("generate", ["M", "--prompt", "hi"], "--seed", ["-3", str(2**63)], "0"),
    ("energy", ["M"], "--context", ["0"], "1"),
    ("energy", ["M"], "--e-ac", ["0", "-0.9"], "1e-3"),
    ("energy", ["M"], "--e-mac", ["0", "-4.6"], "1e-3"),
    ("study", ["F"], "--jobs", ["0", "-1", "1.5"], "1"),
]


def numeric_options() -> dict[tuple[str, str], argparse.Action]:
    """(subcommand, option) -> action for every option whose value is a number, in every subcommand."""
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    found = {}
    for command, parser in sub.choices.items():
        for action in parser._actions:
            if action.type in (int, float) or hasattr(action.type, "allowed"):
                found[(command, action.option_strings[-1] if action.option_strings else action.dest)] = action
    return found


def test_every_numeric_option_has_a_range_and_a_case_here():
    options = numeric_options()
    bare = sorted(key for key, action in options.items() if action.type in (int, float))
    assert not bare, f"options parsed with a bare int/float (no range check): {bare}; use eval.argtypes"
    assert set(options) == {(command, option) for command, _, option, _, _ in CASES}


@pytest.mark.parametrize("command, needed, option, bad, good", CASES, ids=lambda v: v if isinstance(v, str) else "")
def test_out_of_range_is_one_line_exit_2(capsys, command, needed, option, bad, good):
    allowed = numeric_options()[(command, option)].type.allowed
    for value in bad:
        with pytest.raises(SystemExit) as exit_info:
            main([command, *needed, f"{option}={value}"])
        assert exit_info.value.code == 2
        captured = capsys.readouterr()
        err = captured.err.strip()
        assert err.count("\n") == 0 and captured.out == "", err
        assert err.startswith(f"spikedistill {command}: error: argument {option}: must be {allowed}, got '{value}'")
    args, _ = build_parser().parse_known_args([command, *needed, option, good])
    assert getattr(args, option.lstrip("-").replace("-", "_")) == pytest.approx(float(good))


def test_ranges_are_written_as_they_are_checked():
    assert int_range(1).allowed == "an integer >= 1"
    assert int_range(0, 9).allowed == "an integer in [0, 9]"
    assert float_range(0, 1, lo_open=True).allowed == "a number in (0, 1]"
    assert float_range(0, lo_open=True).allowed == "a number > 0"
    top_p = float_range(0, 1, lo_open=True)
    assert top_p("1") == 1.0 and top_p("1e-9") == 1e-9
    for text in ("0", "1.0000001", "nan"):
        with pytest.raises(argparse.ArgumentTypeError, match=re.escape("must be a number in (0, 1]")):
            top_p(text)


def test_the_issue_example_through_the_console_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline", "generate", str(tmp_path), "--prompt", "hi",
                           "--max-new-tokens", "-5"], capture_output=True, text=True, cwd=ROOT, check=False)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().count("\n") == 0
    assert "--max-new-tokens: must be an integer >= 1, got '-5'" in proc.stderr


def test_other_usage_errors_are_one_line_too(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "M"])
    err = capsys.readouterr().err.strip()
    assert exit_info.value.code == 2 and err.count("\n") == 0 and "--prompt" in err and "--help" in err
