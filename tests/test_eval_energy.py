"""Energy accounting against hand computations: the teacher's all-MAC count from its config, the AC/MAC
pricing, and a tiny student end to end (its matmul shapes and measured rates priced by hand)."""

from __future__ import annotations

import json

import pytest
from transformers import LlamaConfig

from eval import EvalError
from eval.energy import (
    CAVEAT,
    energy_report,
    format_energy_table,
    mean_keys,
    price_rows,
    teacher_op_rows,
    totals,
    write_energy_json,
)
from eval.testing import (
    tiny_student,
)

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
    "want of a wife. "
) * 3


def _tiny_llama_config() -> LlamaConfig:
    return LlamaConfig(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )


def test_teacher_all_mac_count_by_hand():
    # per layer: q 32*32 + k 32*16 + v 32*16 + o 32*32 (GQA: 2 KV heads of 8) = 3072;
    # MLP gate 32*64 + up 32*64 + down 64*32 = 6144; head 32*320 = 10240; 2 layers -> 28672 weight MACs.
    # attention at n = 8: a query sees (8+1)/2 = 4.5 keys on average; QK^T and AV: 2 * 4 heads * 8 * 4.5
    # = 288 per layer -> 576.  Total 29248 MACs per token.
    rows = teacher_op_rows(_tiny_llama_config(), context_length=8)
    t = totals(price_rows(rows, e_ac=0.9, e_mac=4.6))
    assert t["macs"] == 29248 and t["sops"] == 0
    assert t["energy_pj"] == pytest.approx(29248 * 4.6)


def test_mean_keys_causal_and_sliding_window():
    assert mean_keys(8) == 4.5
    assert mean_keys(4, window=2) == (1 + 2 + 2 + 2) / 4  # positions see 1, 2, 2, 2 keys
    assert mean_keys(4, window=10) == 2.5


def test_pricing_rows_by_hand():
    rows = [
        {"name": "a", "layer": 0, "kind": "matmul", "ops": 1000.0, "binary_operand": True, "rate": 0.25},
        {"name": "b", "layer": 0, "kind": "norm", "ops": 60.0, "binary_operand": False, "rate": None},
        {"name": "c", "layer": 1, "kind": "matmul", "ops": 100.0, "binary_operand": True, "rate": None},
    ]
    priced = price_rows(rows, e_ac=1.0, e_mac=5.0)
    assert [r["op"] for r in priced] == ["AC", "MAC", "AC"]
    assert [r["energy_pj"] for r in priced] == [250.0, 300.0, 100.0]  # unmeasured rate priced at 1.0
    assert priced[2]["rate_measured"] is False
    t = totals(priced)
    assert (t["sops"], t["macs"], t["energy_pj"]) == (350.0, 60.0, 650.0)
    assert t["mean_firing_rate"] == pytest.approx(350 / 1100)


def test_student_report_by_hand(tiny_tokenizer):
    model = tiny_student(len(tiny_tokenizer), seed=3)  # srwkv, 2 layers, d_model 32, ffn 4*32, T = 1
    rep = energy_report(
        model, 16, tiny_tokenizer, TEXT, teacher_config=_tiny_llama_config(), e_ac=0.9, e_mac=4.6
    )
    rows = {r["name"]: r for r in rep["rows"]}
    c, f, v = 32, 128, len(tiny_tokenizer)
    shapes = {
        "mixer.key": c * c,
        "mixer.value": c * c,
        "mixer.receptance": c * c,
        "mixer.output": c * c,
        "ffn.key": c * f,
        "ffn.receptance": c * c,
        "ffn.value": f * c,
    }
    want_sops = 0.0
    for layer in range(2):
        for name, ops in shapes.items():
            row = rows[f"blocks.{layer}.{name}"]
            assert row["ops"] == ops and row["op"] == "AC" and row["rate_measured"]
            want_sops += ops * row["rate"]
    assert rows["lm_head"]["ops"] == c * v
    want_sops += c * v * rows["lm_head"]["rate"]
    assert rep["totals"]["sops"] == pytest.approx(want_sops)
    macs = sum(r["ops"] for r in rep["rows"] if not r["binary_operand"])
    assert rep["totals"]["energy_pj"] == pytest.approx(0.9 * want_sops + 4.6 * macs)
    assert 0 < rep["totals"]["mean_firing_rate"] < 1  # rates were measured on the text
    # teacher at context 16: 28672 weight MACs + 2 layers * 2 * 4 * 8 * 8.5 attention MACs
    assert rep["teacher"]["macs"] == 28672 + 2 * 2 * 4 * 8 * 8.5
    assert rep["ratio"]["energy_student_over_teacher"] == pytest.approx(
        rep["totals"]["energy_pj"] / rep["teacher"]["energy_pj"]
    )


def test_table_and_json(tiny_tokenizer, tmp_path):
    model = tiny_student(len(tiny_tokenizer), seed=3)
    rep = energy_report(model, 16, tiny_tokenizer, TEXT, teacher_config=_tiny_llama_config())
    table = format_energy_table(rep)
    assert "| blocks.0.mixer.key | 0 | matmul |" in table and "| AC |" in table and "| MAC |" in table
    assert "student/teacher energy" in table and f"Caveat: {CAVEAT}" in table
    write_energy_json(rep, tmp_path / "e.json")
    assert json.loads((tmp_path / "e.json").read_text())["totals"] == rep["totals"]
    with pytest.raises(EvalError, match="context_length must be >= 1"):
        energy_report(model, 0)
