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


def test_text_that_spells_a_special_token_is_scored_as_text(student, tiny_tokenizer):
    """The issue's document: bits/byte scores the literal tokens of "<|endoftext|>" typed in the text (here
    also the tokenizer's BOS/EOS), not the separator id it spells, in both protocols (on today's main the text
    was scored with id 0 in it)."""
    text = "The clerk typed <|endoftext|> into the form."
    doc = tiny_tokenizer(text, add_special_tokens=False, split_special_tokens=True).input_ids
    assert 0 not in doc and tiny_tokenizer.decode(doc) == text  # literal: no separator, decodes back whole
    want = -_logp_sum(student, [0] + doc[:-1], doc)  # one forward after the prefix token (id 0, the BOS here)
    for protocol in ("windows", "stream"):
        res = evaluate_bpb(student, tiny_tokenizer, text, context_length=64, protocol=protocol)
        assert res["tokens"] == len(doc) and res["nll_sum"] == pytest.approx(want, rel=1e-5), protocol


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
    student streamed (`spikegpt`, rolling=stream) and in windows (rolling=windows), a Llama in windows
    (`WindowedHFLM`), and lm-eval's own rolling windows (stock `hf`) == our `windowed_nll`."""
    from transformers import AutoModelForCausalLM

    from eval.models import prefix_token_id
    from eval.scoring import encode_document, windowed_nll

    doc = json.loads(PPL_DATA.read_text().splitlines()[0])["text"][:600]
    llama = AutoModelForCausalLM.from_pretrained(tiny_teacher_dir).eval()
    cases = [
        (student, SpikeGPTLM(student, tokenizer=tiny_tokenizer, max_length=64, rolling="stream"), 64, "stream"),
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


def test_bpb_command_and_lm_eval_spikegpt_agree_by_default(student, tiny_tokenizer, tmp_path, capsys):
    """The issue's pair: `spikedistill bpb --context 64` and `lm_eval --model spikegpt` with max_length=64 on a
    rolling task, each with its defaults, print the same bits/byte for the same student and text (on today's
    main lm-eval streamed by default: a different number). The windows protocol is checked by hand above."""
    from eval.cli import main
    from eval.testing import save_model_dir

    doc = json.loads(PPL_DATA.read_text().splitlines()[0])["text"][:600]
    assert len(tiny_tokenizer.encode(doc)) > 2 * 64  # several windows, so the protocols differ
    (tmp_path / "doc.txt").write_text(doc, encoding="utf-8")
    folder = save_model_dir(student, tiny_tokenizer, tmp_path / "student")
    assert main(["bpb", str(folder), str(tmp_path / "doc.txt"), "--context", "64"]) == 0
    printed = capsys.readouterr().out
    lm_bpb = _lm_eval_bpb(SpikeGPTLM.create_from_arg_string(f"pretrained={folder},max_length=64"), doc)
    assert f": {lm_bpb:.4f} bits/byte" in printed and "windows of 64 tokens, stride 32" in printed
    streamed = evaluate_bpb(student, tiny_tokenizer, doc, context_length=64, protocol="stream")["bits_per_byte"]
    assert f"{streamed:.4f}" != f"{lm_bpb:.4f}"


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

# ---------------------------------------------------------------- the bootstrap interval beside a score


def test_block_sums_by_hand():
    """10 bytes in blocks of 4 -> sizes 4, 4, 2; a token goes to the block of its last byte (end - 1)."""
    from eval.bpb import block_sums

    nll, sizes = block_sums([1.0, 2.0, 3.0, 4.0, 5.0], [2, 4, 5, 9, 10], n_bytes=10, block_bytes=4)
    assert nll.tolist() == [3.0, 3.0, 9.0] and sizes.tolist() == [4.0, 4.0, 2.0]
    with pytest.raises(EvalError, match="block_bytes >= 1"):
        block_sums([1.0], [1], n_bytes=1, block_bytes=0)


def test_bootstrap_interval_known_answers():
    from eval.bpb import bootstrap_interval

    ln2 = math.log(2)
    same = bootstrap_interval([2.0, 2.0, 2.0], [4.0, 4.0, 4.0], block_bytes=4)
    assert same["low"] == same["high"] == pytest.approx(0.5 / ln2) and same["half_width"] == 0.0
    # two blocks: a resample is (1,1), (2,2) or one of each, so the statistic takes three values, 1/4 of the
    # draws each end: the 2.5% and 97.5% points are the two single-block values, 0.5/ln2 and 1.5/ln2
    two = bootstrap_interval([1.0, 6.0], [2.0, 4.0], block_bytes=4, replicates=2000)
    assert two["low"] == pytest.approx(0.5 / ln2) and two["high"] == pytest.approx(1.5 / ln2)
    assert two["half_width"] == pytest.approx(0.5 / ln2) and two["blocks"] == 2 and two["level"] == 0.95
    # the middle half of the draws is one of each block: pooled bytes, (1 + 6) / (2 + 4), not the mean of the
    # two blocks' bits/byte (1.0)
    middle = bootstrap_interval([1.0, 6.0], [2.0, 4.0], level=0.4)
    assert middle["low"] == middle["high"] == pytest.approx(7 / 6 / ln2)
    assert bootstrap_interval([1.0], [4.0]) is None  # one block cannot be resampled
    assert bootstrap_interval([1.0, 6.0], [2.0, 4.0]) == bootstrap_interval([1.0, 6.0], [2.0, 4.0])  # seeded


def test_token_byte_ends(tiny_tokenizer):
    """The byte just past each token: on ASCII text, the running length of the decoded tokens; on any text, the
    last token ends at the last byte and every end falls on a character boundary."""
    from eval.bpb import token_byte_ends

    ascii_text = "To be, or not to be, that is the question."
    ids = tiny_tokenizer.encode(ascii_text, add_special_tokens=False)
    ends = token_byte_ends(tiny_tokenizer, ascii_text, ids)
    running = [len(tiny_tokenizer.decode(ids[: i + 1]).encode()) for i in range(len(ids))]
    assert ends == running and ends[-1] == len(ascii_text)
    ids = tiny_tokenizer.encode(TEXT, add_special_tokens=False)
    ends = token_byte_ends(tiny_tokenizer, TEXT, ids)
    raw = TEXT.encode("utf-8")
    assert len(ends) == len(ids) and ends[-1] == len(raw) and ends == sorted(ends)
    for end in ends:
        raw[:end].decode("utf-8")  # never inside a character
    assert token_byte_ends(tiny_tokenizer, TEXT, ids[:-1]) is None  # offsets of other ids are not used


def test_score_interval_brackets_the_score_and_blocks_cover_the_text(student, tiny_tokenizer):
    from eval.bpb import block_sums, document_nll, token_byte_ends

    text = (TEXT + "\n") * 6
    res = evaluate_bpb(student, tiny_tokenizer, text, context_length=16, block_bytes=64)
    interval = res["interval"]
    assert interval["blocks"] == math.ceil(res["bytes"] / 64) and interval["block_bytes"] == 64
    assert interval["low"] <= res["bits_per_byte"] <= interval["high"] and interval["half_width"] > 0
    total, per_token, tokens, _ = document_nll(student, tiny_tokenizer, text, Protocol("windows", 16))
    assert float(per_token.sum()) == pytest.approx(total, rel=1e-6) == pytest.approx(res["nll_sum"], rel=1e-9)
    nll, sizes = block_sums(per_token.numpy(), token_byte_ends(tiny_tokenizer, text, tokens), res["bytes"], 64)
    assert nll.sum() == pytest.approx(res["nll_sum"], rel=1e-6) and sizes.sum() == res["bytes"]
    assert "interval" not in evaluate_bpb(student, tiny_tokenizer, text, context_length=16)


def test_bytes_and_blocks_do_not_depend_on_the_tokenizer(student, tiny_tokenizer):
    """Two vocabularies (the tiny teacher's and a 300-token BPE that adds BOS) on one text: a different number of
    tokens, the same UTF-8 byte count and the same blocks, so bits/byte and its interval compare across them."""
    tok = bos_tokenizer()
    text = (TEXT + "\n") * 3
    a = evaluate_bpb(student, tiny_tokenizer, text, context_length=16, block_bytes=128)
    b = evaluate_bpb(tiny_llama(len(tok), seed=1), tok, text, context_length=16, block_bytes=128)
    assert a["tokens"] != b["tokens"] and a["bytes"] == b["bytes"] == len(text.encode("utf-8"))
    assert a["interval"]["blocks"] == b["interval"]["blocks"] == math.ceil(a["bytes"] / 128)


@pytest.mark.parametrize("stream", [True, False])
def test_the_evaluate_stage_streams_only_when_asked(tiny_tokenizer, stream):
    """evaluate.stream adds the student's one streamed pass beside the windows protocol, and only then; the
    windows figure does not depend on it."""
    from types import SimpleNamespace

    from pipeline.stages.evaluate import _student_scores

    e = SimpleNamespace(context_length=32, batch_size=4, stream=stream)
    student = tiny_student(len(tiny_tokenizer), seed=3)
    row = _student_scores(student, tiny_tokenizer, {"t": TEXT}, e)["t"]
    windows = evaluate_bpb(student, tiny_tokenizer, TEXT, context_length=32, stride=16)
    assert row["bits_per_byte"] == pytest.approx(windows["bits_per_byte"])
    assert ("stream" in row) is stream
    if stream:
        alone = evaluate_bpb(student, tiny_tokenizer, TEXT, context_length=32, protocol="stream")
        assert row["stream"]["bits_per_byte"] == pytest.approx(alone["bits_per_byte"])
