"""The standalone bits-per-byte evaluator: honest UTF-8 byte counts, one streaming pass for the student, and
agreement with lm-eval's bits_per_byte on the same text (student via `spikegpt`, tiny Llama via `hf`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from lm_eval.models.huggingface import HFLM

from eval import EvalError
from eval.bpb import count_words, evaluate_bpb, read_eval_text
from eval.harness import TASKS_DIR, SpikeGPTLM, run_tasks
from eval.testing import (
    tiny_student,
)

TEXT = (
    "Anne Elliot — naïve? No: «persuaded». Café au lait, déjà vu.\nTo be, or not to be, that is the question."
)
PPL_DATA = Path(__file__).resolve().parents[1] / "eval" / "tasks" / "data" / "ppl_hamlet.jsonl"


@pytest.fixture(scope="module")
def student(tiny_tokenizer):
    return tiny_student(len(tiny_tokenizer), seed=2)


def test_bytes_words_and_formula_by_hand(student, tiny_tokenizer):
    res = evaluate_bpb(student, tiny_tokenizer, TEXT, context_length=1024)
    assert res["bytes"] == len(TEXT.encode("utf-8")) > len(TEXT)  # multi-byte characters counted as bytes
    assert res["words"] == len(TEXT.split()) == count_words(TEXT)
    ids = [tiny_tokenizer.eos_token_id] + tiny_tokenizer.encode(TEXT)  # conditioned on BOS (= EOS here)
    with torch.no_grad():
        logp = student(torch.tensor([ids[:-1]])).logits[0].double().log_softmax(-1)
    nll = -float(logp.gather(1, torch.tensor(ids[1:])[:, None]).sum())
    assert res["tokens"] == len(ids) - 1
    assert res["nll_sum"] == pytest.approx(nll, rel=1e-5)
    assert res["bits_per_byte"] == pytest.approx(nll / res["bytes"] / math.log(2), rel=1e-5)
    assert res["byte_perplexity"] == pytest.approx(math.exp(nll / res["bytes"]), rel=1e-5)
    assert res["word_perplexity"] == pytest.approx(math.exp(nll / res["words"]), rel=1e-5)


def test_student_streaming_is_independent_of_chunk_size(student, tiny_tokenizer):
    one_pass = evaluate_bpb(student, tiny_tokenizer, TEXT, context_length=4096)["bits_per_byte"]
    chunked = evaluate_bpb(student, tiny_tokenizer, TEXT, context_length=7)["bits_per_byte"]
    assert chunked == pytest.approx(one_pass, rel=1e-5)


def test_agrees_with_lm_eval_bits_per_byte(student, tiny_tokenizer, tiny_teacher_dir):
    """lm-eval's bits_per_byte on document 0 of spikedistill_ppl_hamlet == evaluate_bpb on that text."""
    from transformers import AutoModelForCausalLM

    doc = json.loads(PPL_DATA.read_text().splitlines()[0])["text"][:600]
    llama = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    for model, lm, ctx in [
        (student, SpikeGPTLM(student, tokenizer=tiny_tokenizer, max_length=64), 64),
        (llama, HFLM(pretrained=llama, tokenizer=tiny_tokenizer, max_length=48, batch_size=2), 48),
    ]:
        lm_bpb = _lm_eval_bpb(lm, doc)
        ours = evaluate_bpb(model, tiny_tokenizer, doc, context_length=ctx, batch_size=2)["bits_per_byte"]
        assert ours == pytest.approx(lm_bpb, rel=1e-5)


def _lm_eval_bpb(lm, text: str) -> float:
    """lm-eval's own bits_per_byte for one document, via a rolling task built in memory."""
    import datasets
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks import TaskManager

    def one_doc(**_):
        return datasets.DatasetDict({"validation": datasets.Dataset.from_list([{"text": text}])})

    task = ConfigurableTask(
        config={
            "task": "one_doc_ppl",
            "custom_dataset": one_doc,
            "output_type": "loglikelihood_rolling",
            "validation_split": "validation",
            "doc_to_text": "",
            "doc_to_target": "{{text}}",
            "metric_list": [
                {"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False}
            ],
        }
    )
    res = run_tasks(lm, [task], manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False))
    return res["results"]["one_doc_ppl"]["bits_per_byte,none"]


def test_read_eval_text(tmp_path):
    assert "Hamlet" in read_eval_text("hamlet")[:200]
    path = tmp_path / "t.txt"
    path.write_text(TEXT, encoding="utf-8")
    assert read_eval_text(str(path)) == TEXT
    with pytest.raises(EvalError, match="nope: neither a file nor a bundled"):
        read_eval_text("nope")
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(EvalError, match="not UTF-8"):
        read_eval_text(str(tmp_path / "bad.txt"))


def test_student_with_max_position_falls_back_to_windows(tiny_tokenizer):
    """A student whose config caps max_position cannot stream a longer text: it is scored in windows of at
    most max_position tokens (lm-eval's scheme), instead of failing."""
    from eval.models import prefix_token_id
    from eval.scoring import encode_document, windowed_nll

    capped = tiny_student(len(tiny_tokenizer), seed=2, token_mixer="sfsa", max_position=24)
    tokens = encode_document(tiny_tokenizer, TEXT)
    assert len(tokens) > 24
    res = evaluate_bpb(capped, tiny_tokenizer, TEXT, context_length=1024)
    want = windowed_nll(capped, tokens, prefix_token_id(tiny_tokenizer), 24)
    assert res["nll_sum"] == pytest.approx(want, rel=1e-6)
