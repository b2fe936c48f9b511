"""The eval subcommands (generate streams, seeds reproduce, energy/eval/bpb write their files, errors are one
line with exit code 2) and the sampling rules of eval.generate."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from eval.cli import main, register
from eval.generate import generate_text, sampling_kwargs
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
        ["generate", "M", "--prompt", "p", "--top-p", "0.9", "--seed", "1", "--repetition-penalty", "1.3"],
        ["energy", "M", "--teacher", "T", "--context", "64", "--json", "f.json"],
        ["leaderboard", "runs"],
        ["bpb", "M", "hamlet"],
    ):
        args = parser.parse_args(argv)
        assert callable(args.func)


def _greedy_until_eos(model, ids: list[int], n: int) -> list[int]:
    """Greedy continuation by full recompute (no state, no transformers generate), stopping at EOS (id 0)."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            token = int(model(torch.tensor([seq])).logits[0, -1].argmax())
            if token == 0:
                break
            seq.append(token)
    return seq[len(ids) :]


def test_generate_text_streams_the_greedy_continuation(student, tiny_tokenizer):
    prompt, pieces = "It is a truth", []
    text = generate_text(student, tiny_tokenizer, prompt, max_new_tokens=10, on_text=pieces.append)
    own = _greedy_until_eos(student, tiny_tokenizer.encode(prompt), 10)
    assert len(pieces) > 1  # text arrives piece by piece, not at the end
    assert "".join(pieces) == text == tiny_tokenizer.decode(own, skip_special_tokens=True)
    cut = generate_text(student, tiny_tokenizer, prompt, max_new_tokens=10, stop=lambda so_far: len(so_far) >= 3)
    assert text.startswith(cut) and len(cut) >= 3 and len(cut) < len(text)


def test_sampling_seed_top_k_top_p(student, tiny_tokenizer):
    def run(**kw):
        return generate_text(student, tiny_tokenizer, "To be", 8, **kw)

    assert run(temperature=1.0, seed=3) == run(temperature=1.0, seed=3)
    assert run(temperature=1.0, seed=3) != run(temperature=1.0, seed=4)
    assert run(temperature=1.0, top_k=1, seed=3) == run()  # top-k 1 is greedy
    assert run(temperature=1.0, top_p=1e-6, seed=4) == run()  # top-p keeps at least the top token
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    run(temperature=1.0, seed=5)
    assert torch.equal(torch.rand(3), before)  # a seeded sample leaves the global RNG alone
    assert sampling_kwargs(0.0, 5, 0.5)["do_sample"] is False
    ids = torch.tensor([tiny_tokenizer.encode("To be")])
    with torch.no_grad():
        top2 = set(student(ids).logits[0, -1].topk(2).indices.tolist())
    picks = set()
    for seed in range(30):
        torch.manual_seed(seed)
        out = student.generate(ids, max_new_tokens=1, **sampling_kwargs(1.0, top_k=2))
        picks.add(int(out[0, -1]))
    assert picks == top2


def _greedy_with_repetition_penalty(model, ids: list[int], n: int, penalty: float) -> list[int]:
    """Greedy by full recompute, with CTRL's repetition penalty done by hand: each token already in the sequence
    has its logit divided by `penalty` when positive, multiplied by it when negative. Stops at EOS (id 0)."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([seq])).logits[0, -1].double()
            for t in set(seq):
                logits[t] = logits[t] / penalty if logits[t] > 0 else logits[t] * penalty
            token = int(logits.argmax())
            if token == 0:
                break
            seq.append(token)
    return seq[len(ids):]


def test_repetition_penalty_matches_a_hand_penalised_greedy_loop(student, tiny_tokenizer):
    prompt = "It is a truth"
    ids = tiny_tokenizer.encode(prompt)
    plain = generate_text(student, tiny_tokenizer, prompt, 16)
    for penalty in (1.5, 4.0):
        want = tiny_tokenizer.decode(_greedy_with_repetition_penalty(student, ids, 16, penalty),
                                     skip_special_tokens=True)
        assert generate_text(student, tiny_tokenizer, prompt, 16, repetition_penalty=penalty) == want
    assert want != plain  # the penalty changes this continuation, so the comparison above can fail
    assert generate_text(student, tiny_tokenizer, prompt, 16, repetition_penalty=1.0) == plain
    with pytest.raises(ValueError, match="repetition_penalty"):
        sampling_kwargs(repetition_penalty=0.0)


def test_generate_command_prints_prompt_and_continuation(student_dir, capsys):
    assert main(["generate", str(student_dir), "--prompt", "It is a truth", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("It is a truth")


def test_generate_command_streams_tokens_as_they_are_produced(student_dir, monkeypatch):
    import sys

    import eval.models

    events: list = []
    load_any = eval.models.load_any

    def load_and_watch(spec):
        model, tok = load_any(spec)
        model.register_forward_pre_hook(lambda *args: events.append("forward"))
        return model, tok

    class Tee:
        def write(self, text):
            events.append(("print", text))

        def flush(self):
            pass

    monkeypatch.setattr(eval.models, "load_any", load_and_watch)
    monkeypatch.setattr(sys, "stdout", Tee())
    assert main(["generate", str(student_dir), "--prompt", "It is a truth", "--max-new-tokens", "8"]) == 0
    forwards = [i for i, e in enumerate(events) if e == "forward"]
    assert len(forwards) == 8  # the prompt, then one step per further token
    # the generated text reaches stdout piece by piece between decode steps, not after the last one
    pieces_before_last = [e for e in events[forwards[0] : forwards[-1]] if e != "forward"]
    assert len(pieces_before_last) >= 3, events


def test_every_generation_path_stops_at_the_training_separator(chain_export, capsys):
    """The issue's smallest case (" a", the separator, " b", " c"): `generate_text`, `spikedistill generate`,
    the evaluate stage's sample and lm-eval's generate_until, with or without `until`, all return " a" (on
    today's main they passed the tokenizer's EOS alone and returned " a b c")."""
    from types import SimpleNamespace

    from lm_eval.api.instance import Instance
    from transformers import AutoModelForCausalLM

    from eval.harness import SpikeGPTLM
    from pipeline.stages.evaluate import _sample

    folder, tok, _ = chain_export
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    want = " a"
    assert generate_text(model, tok, "Once", 4) == want
    assert main(["generate", folder, "--prompt", "Once", "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out == "Once" + want + "\n"
    e = SimpleNamespace(sample_tokens=4, sample_prompt="Once", sample_temperature=0.0, sample_top_k=0,
                        sample_top_p=1.0, sample_repetition_penalty=1.0)
    assert _sample(model, tok, e, seed=0)["text"] == want
    lm = SpikeGPTLM(model, tokenizer=tok, max_length=32)
    for gen_kwargs in ({"max_gen_toks": 4}, {"max_gen_toks": 4, "until": ["never"]}):
        req = Instance(request_type="generate_until", doc={}, arguments=("Once", gen_kwargs), idx=0)
        assert lm.generate_until([req], disable_tqdm=True) == [want], gen_kwargs


def test_text_cut_inside_a_character_is_printed_as_returned(tmp_path, capsys):
    """New tokens [" a", byte 0xE2] (a character cut off by max_new_tokens): the pieces, the printed text and
    the returned text are the same " a\ufffd" (on today's main the held-back byte was never printed)."""
    from eval.testing import chain_student, chat_tokenizer

    tok = chat_tokenizer()
    once, a, cut = tok.encode("Once")[0], tok.encode(" a")[0], tok.convert_tokens_to_ids("\u00e2")  # byte 0xE2
    model = chain_student(len(tok), {once: a, a: cut})
    want = tok.decode([a, cut])
    assert want == " a\ufffd"
    pieces: list[str] = []
    assert generate_text(model, tok, "Once", 2, on_text=pieces.append) == want and "".join(pieces) == want
    assert main(["generate", str(save_model_dir(model, tok, tmp_path / "m")), "--prompt", "Once",
                 "--max-new-tokens", "2"]) == 0
    assert capsys.readouterr().out == "Once" + want + "\n"


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


def test_energy_refuses_a_huge_context_in_one_line_before_loading(tmp_path, capsys):
    """`energy --context 100000` used to run silently for minutes: now one line, exit 2, before any model loads
    (the model folder here does not even exist)."""
    assert main(["energy", str(tmp_path / "no_model"), "--context", "100000"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "context 100000 is outside 1..16,384" in err and "lower --context" in err


def test_eval_writes_beside_the_run_not_into_the_model_and_the_leaderboard_shows_it(
        student, tiny_tokenizer, tmp_path, monkeypatch, capsys):
    """A run's exported model: results go to <run>/eval, the shared model folder gets no file, and the
    leaderboard merges the task scores (with their item counts) into that run's row beside its evaluate
    results. Any other model: runs/<its name>/eval under the working directory, a row of its own."""
    from eval.leaderboard import build_leaderboard, collect_results

    runs = tmp_path / "runs"
    model = save_model_dir(student, tiny_tokenizer, runs / "r1" / "export" / "model")
    (runs / "r1" / "config.yaml").write_text("run: {name: r1}\n")
    (runs / "r1" / "evaluate").mkdir()
    bpb = {"hamlet": {"bits_per_byte": 3.5, "tokens": 10, "bytes": 40}}
    (runs / "r1" / "evaluate" / "results.json").write_text(json.dumps(collect_results("r1", str(model), bpb)))
    before = sorted(p.name for p in model.iterdir())
    task = ["--tasks", "spikedistill_hamlet_next_line", "--limit", "2"]
    assert main(["eval", str(model), *task]) == 0
    out = capsys.readouterr().out
    assert f"results go to {runs.resolve() / 'r1' / 'eval'}" in out and "spikedistill leaderboard" in out
    assert sorted(p.name for p in model.iterdir()) == before  # nothing written into the shared folder
    assert (runs / "r1" / "eval" / "results.json").is_file() and (runs / "r1" / "eval" / "lm_eval_student.json").is_file()

    other = save_model_dir(student, tiny_tokenizer, tmp_path / "elsewhere" / "mymodel")
    monkeypatch.chdir(tmp_path)
    assert main(["eval", str(other), *task]) == 0
    assert (runs / "mymodel" / "eval" / "results.json").is_file()
    rows = {r["run"]: r for r in build_leaderboard(runs, tmp_path / "lb")["rows"] if r["role"] == "student"}
    assert set(rows) == {"r1", "mymodel"}
    assert rows["r1"]["bits_per_byte"] == {"hamlet": 3.5}  # the evaluate stage's figure, kept
    assert rows["r1"]["acc_n"] == rows["mymodel"]["acc_n"] == {"spikedistill_hamlet_next_line": 2}
    md = (tmp_path / "lb" / "leaderboard.md").read_text()
    assert f"{rows['r1']['acc']['spikedistill_hamlet_next_line']:.3f} (n=2)" in md

    (runs / "mymodel" / "config.yaml").write_text("run: {name: mymodel}\n")  # now a pipeline run of another model
    capsys.readouterr()
    assert main(["eval", str(other), *task]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "pipeline run of another model" in err and "--output" in err
