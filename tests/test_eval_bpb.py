"""The standalone bits-per-byte evaluator: honest UTF-8 byte counts; the windows protocol (every window led by
the prefix token, one BOS for a BOS-adding tokenizer) against a hand computation; the student's streamed pass;
agreement with lm-eval's bits_per_byte (student via `spikegpt`, tiny Llama via our windowed `hf` and, for
lm-eval's own rolling windows, the stock `hf`)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from lm_eval.models.huggingface import HFLM

from eval import EvalError
from eval.bpb import count_words, evaluate_bpb, read_eval_text
from eval.harness import TASKS_DIR, SpikeGPTLM, WindowedHFLM, run_tasks
from eval.scoring import Protocol
from eval.testing import bos_tokenizer, tiny_llama, tiny_student

TEXT = (
    "Anne Elliot — naïve? No: «persuaded». Café au lait, déjà vu.\nTo be, or not to be, that is the question."
)
PPL_DATA = Path(__file__).resolve().parents[1] / "eval" / "tasks" / "data" / "ppl_hamlet.jsonl"


@pytest.fixture(scope="module")
def student(tiny_tokenizer):
    return tiny_student(len(tiny_tokenizer), seed=2)


def _logp_sum(model, inputs: list[int], targets: list[int]) -> float:
    """Sum of log p(targets[i] | inputs[:i+1]) over the last len(targets) positions of one float64 forward."""
    with torch.no_grad():
        logp = model(torch.tensor([inputs])).logits[0].double().log_softmax(-1)[-len(targets) :]
    return float(logp.gather(1, torch.tensor(targets)[:, None]).sum())


def _windows_nll_by_hand(model, doc: list[int], lead: int, window: int, stride: int) -> tuple[float, int]:
    """Window k covers document tokens [k*stride, k*stride + window); the model reads `lead` and all but the
    last covered token, and each token is scored in the first window that covers it."""
    nll, scored, k = 0.0, 0, 0
    while scored < len(doc):
        covered = doc[k * stride : k * stride + window]
        new = covered[scored - k * stride :]
        assert new, "the windows must advance"
        nll -= _logp_sum(model, [lead] + covered[:-1], new)
        scored, k = scored + len(new), k + 1
    return nll, scored


def test_bytes_words_and_formula_by_hand(student, tiny_tokenizer):
    res = evaluate_bpb(student, tiny_tokenizer, TEXT, context_length=1024, protocol="stream")
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
    one_pass = evaluate_bpb(student, tiny_tokenizer, TEXT, context_length=4096, protocol="stream")
    chunked = evaluate_bpb(student, tiny_tokenizer, TEXT, context_length=7, protocol="stream")
    assert chunked["bits_per_byte"] == pytest.approx(one_pass["bits_per_byte"], rel=1e-5)
    assert chunked["protocol"]["kind"] == "stream"


@pytest.mark.parametrize("window,stride", [(8, 3), (8, 8), (12, None)])
def test_windows_protocol_by_hand_plain_tokenizer(student, tiny_tokenizer, window, stride):
    """Student and a tiny Llama, one protocol: every window led by the prefix (EOS here: no BOS is added)."""
    doc = tiny_tokenizer.encode(TEXT, add_special_tokens=False)
    llama = tiny_llama(len(tiny_tokenizer))
    for model in (student, llama):
        res = evaluate_bpb(model, tiny_tokenizer, TEXT, context_length=window, stride=stride, batch_size=3)
        want, scored = _windows_nll_by_hand(model, doc, tiny_tokenizer.eos_token_id, window, stride or window // 2)
        assert scored == res["tokens"] == len(doc)
        assert res["nll_sum"] == pytest.approx(want, rel=1e-5)
        assert res["bits_per_byte"] == pytest.approx(want / res["bytes"] / math.log(2), rel=1e-5)
        assert res["protocol"] == Protocol("windows", window, stride).as_dict()


def test_windows_protocol_by_hand_bos_tokenizer():
    """A tokenizer that adds BOS itself: every window starts with exactly one BOS, every token scored once."""
    tok = bos_tokenizer()
    text = "The lamps were lit early and the road grew soft."
    model = tiny_llama(len(tok), seed=1)
    doc = tok.encode(text, add_special_tokens=False)
    assert tok.encode(text)[:2] == [tok.bos_token_id, doc[0]] and tok.bos_token_id not in doc
    res = evaluate_bpb(model, tok, text, context_length=10, stride=4)
    want, scored = _windows_nll_by_hand(model, doc, tok.bos_token_id, 10, 4)
    assert res["tokens"] == scored == len(doc)
    assert res["nll_sum"] == pytest.approx(want, rel=1e-5)
    # the double-BOS reading ([bos, bos, ...] in the first window) gives a different, larger count
    doubled, n_doubled = _windows_nll_by_hand(model, tok.encode(text), tok.bos_token_id, 10, 4)
    assert n_doubled == len(doc) + 1 and doubled != pytest.approx(res["nll_sum"], rel=1e-3)


def test_windows_inputs_start_with_bos(monkeypatch):
    """The model's inputs themselves: each window's first id is BOS, and BOS appears nowhere else."""
    tok = bos_tokenizer()
    model = tiny_llama(len(tok), seed=1)
    seen = []
    model.register_forward_pre_hook(lambda m, args, kwargs: seen.append(kwargs.get("input_ids", args[0] if args
                                                                                    else None)), with_kwargs=True)
    evaluate_bpb(model, tok, TEXT, context_length=16, stride=8, batch_size=1)
    assert len(seen) > 2
    for ids in seen:
        assert ids[0, 0] == tok.bos_token_id and (ids[0, 1:] == tok.bos_token_id).sum() == 0


def test_agrees_with_lm_eval_bits_per_byte(student, tiny_tokenizer, tiny_teacher_dir):
    """lm-eval's bits_per_byte on document 0 of spikedistill_ppl_hamlet == evaluate_bpb on that text: the
    student streamed (`spikegpt`, default rolling) and in windows (rolling=windows), a Llama in windows
    (`WindowedHFLM`), and lm-eval's own rolling windows (stock `hf`) == our `windowed_nll`."""
    from transformers import AutoModelForCausalLM

    from eval.models import prefix_token_id
    from eval.scoring import encode_document, windowed_nll

    doc = json.loads(PPL_DATA.read_text().splitlines()[0])["text"][:600]
    llama = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    cases = [
        (student, SpikeGPTLM(student, tokenizer=tiny_tokenizer, max_length=64), 64, "stream"),
        (student, SpikeGPTLM(student, tokenizer=tiny_tokenizer, max_length=64, rolling="windows"), 64, "windows"),
        (llama, WindowedHFLM(pretrained=llama, tokenizer=tiny_tokenizer, max_length=48, batch_size=2), 48,
         "windows"),
    ]
    for model, lm, ctx, protocol in cases:
        lm_bpb = _lm_eval_bpb(lm, doc)
        ours = evaluate_bpb(model, tiny_tokenizer, doc, context_length=ctx, batch_size=2, protocol=protocol)
        assert ours["bits_per_byte"] == pytest.approx(lm_bpb, rel=1e-5)
    stock = _lm_eval_bpb(HFLM(pretrained=llama, tokenizer=tiny_tokenizer, max_length=48, batch_size=2), doc)
    tokens = encode_document(tiny_tokenizer, doc)
    nll = windowed_nll(llama, tokens, prefix_token_id(tiny_tokenizer), 48, 2)
    assert stock == pytest.approx(nll / len(doc.encode("utf-8")) / math.log(2), rel=1e-5)


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


def test_student_with_max_position(tiny_tokenizer):
    """A student whose config caps max_position: its windows are capped at max_position tokens, and asking
    it to stream a longer text is a one-line error."""
    capped = tiny_student(len(tiny_tokenizer), seed=2, token_mixer="sfsa", max_position=24)
    doc = tiny_tokenizer.encode(TEXT, add_special_tokens=False)
    assert len(doc) > 24
    res = evaluate_bpb(capped, tiny_tokenizer, TEXT, context_length=1024)
    want, _ = _windows_nll_by_hand(capped, doc, tiny_tokenizer.eos_token_id, 24, 24)
    assert res["protocol"]["window"] == 24 and res["protocol"]["stride"] == 24
    assert res["nll_sum"] == pytest.approx(want, rel=1e-6)
    with pytest.raises(EvalError, match="cannot stream"):
        evaluate_bpb(capped, tiny_tokenizer, TEXT, protocol="stream")


@pytest.mark.parametrize("kwargs,match", [({"context_length": 1}, "window must be >= 2"),
                                          ({"context_length": 8, "stride": 9}, "stride must be in 1..window"),
                                          ({"protocol": "rolling"}, "must be 'windows' or 'stream'")])
def test_bad_protocol_is_one_line(student, tiny_tokenizer, kwargs, match):
    with pytest.raises(EvalError, match=match):
        evaluate_bpb(student, tiny_tokenizer, TEXT, **kwargs)


@pytest.mark.parametrize("spec", ["teacher", "subset:300", "subset:270", "bytes"])
def test_the_byte_count_is_the_same_under_every_student_vocabulary(tiny_tokenizer, tmp_path, spec):
    """Bits/byte divides by the text's UTF-8 bytes whatever the tokenizer: the scored tokens of a derived
    vocabulary (student.vocab) spell exactly the text's bytes, and evaluate_bpb counts the same bytes."""
    from eval.scoring import encode_document
    from teachers.vocab import student_tokenizer

    text = TEXT + " 👍🏽 日本語 " + "a" * 300 + "\n\n\t 12345"
    tokenizer = student_tokenizer(tiny_tokenizer, spec, cache_dir=tmp_path)
    tokens = encode_document(tokenizer, text)
    assert sum(len(tokenizer.convert_ids_to_tokens(t)) for t in tokens) == len(text.encode("utf-8"))
    row = evaluate_bpb(tiny_student(len(tokenizer), seed=2), tokenizer, text, context_length=64)
    assert row["bytes"] == len(text.encode("utf-8")) and row["tokens"] == len(tokens)
    assert row["bits_per_byte"] == pytest.approx(row["nll_sum"] / row["bytes"] / math.log(2))
