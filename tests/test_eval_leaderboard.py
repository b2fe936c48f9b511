"""Leaderboard from two fake-but-real tiny runs: each run's results.json is really produced by
evaluate_model (bpb, an lm-eval task, energy, a sample; tiny Llama as the teacher)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from eval import EvalError
from eval.leaderboard import SCHEMA, build_leaderboard, load_runs, model_card_row
from eval.testing import (
    save_model_dir,
    tiny_student,
)

TEXTS = {
    "persuasion": "Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who never took up any "
    "book but the Baronetage.",
    "hamlet": "Who's there? Nay, answer me: stand, and unfold yourself. Long live the king!",
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs_dir(tiny_tokenizer, tiny_teacher_dir, tmp_path_factory):
    from eval.leaderboard import evaluate_model

    root = tmp_path_factory.mktemp("runs")
    for name, seed, mixer in [("srwkv-a", 4, "srwkv"), ("sfsa-b", 5, "sfsa")]:
        model_dir = save_model_dir(
            tiny_student(len(tiny_tokenizer), seed=seed, token_mixer=mixer),
            tiny_tokenizer,
            root / name / "export" / "model",
        )
        evaluate_model(
            model_dir,
            name,
            TEXTS,
            tasks=["spikedistill_persuasion_cloze"],
            output_dir=root / name / "evaluate",
            teacher_spec=str(tiny_teacher_dir),
            context_length=32,
            batch_size=4,
            limit=4,
            sample_prompt="It is a truth",
            sample_tokens=5,
        )
    _write_stage_layout_run(root / "stage-layout", tiny_tokenizer)
    return root


def _write_stage_layout_run(run_dir, tokenizer):
    """A run in the pipeline evaluate stage's own results.json layout, from real tiny computations."""
    from eval.bpb import evaluate_bpb
    from eval.energy import energy_report

    model = tiny_student(len(tokenizer), seed=7)
    texts = {n: {"student": evaluate_bpb(model, tokenizer, t, 32), "teacher": None} for n, t in TEXTS.items()}
    results = {
        "model": "stage-layout",
        "model_dir": str(run_dir / "export" / "model"),
        "teacher": "smollm2-135m",
        "texts": texts,
        "bits_per_byte": {
            n: {"student": v["student"]["bits_per_byte"], "teacher": None} for n, v in texts.items()
        },
        "energy": energy_report(model, 32, tokenizer, TEXTS["hamlet"]),
        "sample": None,
    }
    (run_dir / "evaluate").mkdir(parents=True)
    (run_dir / "evaluate" / "results.json").write_text(json.dumps(results))


def test_results_json_has_the_documented_fields(runs_dir):
    res = json.loads((runs_dir / "srwkv-a" / "evaluate" / "results.json").read_text())
    assert res["schema"] == SCHEMA and res["run"] == "srwkv-a"
    st, te = res["student"], res["teacher"]
    assert set(st["bpb"]) == set(TEXTS) and st["bpb"]["hamlet"]["bits_per_byte"] > 0
    assert 0 <= st["tasks"]["spikedistill_persuasion_cloze"]["acc"] <= 1
    assert st["energy"]["energy_pj"] > 0 and st["energy"]["ratio_to_teacher"] > 0
    assert 0 < st["energy"]["mean_firing_rate"] < 1 and st["info"]["params"] > 0
    assert te["bpb"]["hamlet"]["bits_per_byte"] > 0 and "spikedistill_persuasion_cloze" in te["tasks"]
    assert te["energy"]["macs"] > 0 and res["sample"]["prompt"] == "It is a truth"


def test_leaderboard_renders_two_runs(runs_dir, tmp_path):
    out = build_leaderboard(runs_dir, tmp_path / "lb")
    roles = [(r["run"], r["role"]) for r in out["rows"]]
    assert ("sfsa-b", "student") in roles and ("srwkv-a", "student") in roles
    assert sum(role == "teacher" for _, role in roles) == 1  # one teacher row although both runs scored it
    assert ("stage-layout", "student") in roles  # the evaluate stage's own layout is read too
    md = (tmp_path / "lb" / "leaderboard.md").read_text()
    assert (
        "sfsa-b" in md
        and "srwkv-a" in md
        and "bpb hamlet" in md
        and "acc persuasion_cloze" in md
    )
    assert json.loads((tmp_path / "lb" / "leaderboard.json").read_text())["rows"] == out["rows"]
    for key in ("bpb_vs_energy", "task_accuracy"):
        data = Path(out["files"][key]).read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000


def test_model_card_row(runs_dir):
    (res,) = [r for r in load_runs(runs_dir) if r.get("run") == "sfsa-b"]
    card = model_card_row(res)
    lines = [line for line in card.strip().splitlines() if line.startswith("|")]
    assert len(lines) == 6 and "| student |" in lines[2] and "| teacher |" in lines[3]
    assert "| quantised ANN |" in lines[4] and " int8 |" in lines[4] and " ternary |" in lines[5]
    assert f"{res['student']['bpb']['hamlet']['bits_per_byte']:.4f}" in lines[2]
    assert f"{res['student']['bpb']['hamlet']['stream']['bits_per_byte']:.4f}" in lines[2]


def test_one_bpb_protocol_named_in_results_and_tables(runs_dir, tmp_path):
    """Student and teacher bits/byte share one protocol, and the table says which; the student's streamed
    pass is an extra column; energy shows compute, memory-inclusive and the quantised ANN with head shares."""
    res = json.loads((runs_dir / "srwkv-a" / "evaluate" / "results.json").read_text())
    for text in TEXTS:
        st, te = res["student"]["bpb"][text], res["teacher"]["bpb"][text]
        assert st["protocol"] == te["protocol"] == {"kind": "windows", "window": 32, "stride": 16,
                                                    "text": st["protocol"]["text"]}
        assert st["stream"]["protocol"]["kind"] == "stream" and "stream" not in te
    energy = res["student"]["energy"]
    assert energy["memory_inclusive_pj"] > energy["compute_pj"] == energy["energy_pj"] > 0
    assert set(energy["quantised"]) == {"int8", "ternary"} and 0 < energy["head_share_compute"] < 1
    assert res["teacher"]["energy"]["memory_inclusive_pj"] > res["teacher"]["energy"]["compute_pj"]
    build_leaderboard(runs_dir, tmp_path / "lb")
    md = (tmp_path / "lb" / "leaderboard.md").read_text()
    header = md.splitlines()[2]
    for column in ("bpb stream hamlet", "energy/token compute (nJ)", "memory-incl. (nJ)",
                   "head share (compute / mem.)", "break-even rate (compute / mem.)"):
        assert column in header
    assert f"bpb columns, student and teacher alike: {st['protocol']['text']}." in md
    assert res["settings"]["lm_eval_protocol"].startswith("lm-eval loglikelihood_rolling for student and teacher")
    assert md.count("| quantised ANN |") == 2  # int8 and ternary, once although three runs share them


def test_errors_name_the_path(tmp_path):
    with pytest.raises(EvalError, match=r"no \*/evaluate/results.json or \*/eval/results.json found"):
        build_leaderboard(tmp_path, tmp_path / "lb")
    (tmp_path / "r" / "evaluate").mkdir(parents=True)
    (tmp_path / "r" / "evaluate" / "results.json").write_text("{not json")
    with pytest.raises(EvalError, match="results.json: unreadable JSON"):
        load_runs(tmp_path)


def _energy(compute_pj: float, memory_pj: float, ternary: tuple[float, float]) -> dict:
    """An energy_report-shaped dict with only what the leaderboard reads."""
    figures = {"compute_pj": compute_pj, "memory_inclusive_pj": memory_pj, "head_share_compute": 0.5,
               "head_share_memory_inclusive": 0.5}
    q = {"model": "llama 1.00M", "compute_pj": ternary[0], "memory_inclusive_pj": ternary[1],
         "head_share_compute": 0.5, "head_share_memory_inclusive": 0.5}
    return {"context_length": 512, "totals": {"sops": 1.0, "macs": 1.0, "energy_pj": compute_pj,
                                              "mean_firing_rate": 0.2},
            "figures": figures, "quantised": {"ternary": q}, "break_even": None,
            "teacher": {"energy_pj": 9e8, "compute_pj": 9e8, "memory_inclusive_pj": 2e10, "macs": 1.0,
                        "head_share_compute": 0.1, "head_share_memory_inclusive": 0.1}}


def test_energy_per_byte_uses_each_models_own_tokens_per_byte(tmp_path):
    """Student 30 + 20 tokens over 100 + 100 bytes -> 0.25 tokens/byte; the teacher's tokenizer 10 + 10 -> 0.1:
    per byte = per token x its own tokens/byte (the quantised ANN: the student's), by hand."""
    from eval.leaderboard import collect_results, markdown_table, rows_of

    student_bpb = {"persuasion": {"bits_per_byte": 2.0, "tokens": 30, "bytes": 100},
                   "hamlet": {"bits_per_byte": 3.0, "tokens": 20, "bytes": 100}}
    teacher_bpb = {t: {"bits_per_byte": 1.0, "tokens": 10, "bytes": 100} for t in student_bpb}
    res = collect_results("r", "m", student_bpb, energy=_energy(2e6, 1e9, (1e6, 3e8)), teacher_name="T",
                          teacher_bpb=teacher_bpb, model_info={"params": 10, "vocab_size": 256})
    rows = {r["role"]: r for r in rows_of(res)}
    s, t, q = rows["student"], rows["teacher"], rows["quantised ANN"]
    assert s["tokens_per_byte"] == 0.25 and t["tokens_per_byte"] == 0.1 and q["tokens_per_byte"] == 0.25
    assert (s["compute_pj_per_byte"], s["memory_pj_per_byte"]) == (0.25 * 2e6, 0.25 * 1e9)
    assert (t["compute_pj_per_byte"], t["memory_pj_per_byte"]) == (0.1 * 9e8, 0.1 * 2e10)
    assert (q["compute_pj_per_byte"], q["memory_pj_per_byte"]) == (0.25 * 1e6, 0.25 * 3e8)
    assert s["quantised_pj"] == {"ternary": {"compute_pj": 1e6, "memory_inclusive_pj": 3e8}}
    assert s["vocab_size"] == 256
    md = markdown_table(list(rows.values()))
    # student: 2,000 nJ/token, 0.25 tokens/byte, 500 nJ/byte compute, 250,000,000 pJ = 250,000 nJ/byte memory
    assert "| 2,000.00 | 1,000,000 | 0.2500 | 500.00 | 250,000 |" in md
    assert "tokens/byte: tokens per UTF-8 byte" in md
