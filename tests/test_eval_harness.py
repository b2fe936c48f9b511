"""The `spikegpt` lm-eval adapter on a tiny random student: loglikelihood, rolling, generate_until, offline
tasks through simple_evaluate (instance and registered name), the stock lm_eval CLI, teacher beside
student."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lm_eval
import pytest
import torch
from lm_eval.api.instance import Instance

from eval.harness import TASKS_DIR, SpikeGPTLM, evaluate_tasks, run_tasks
from eval.testing import (
    save_model_dir,
    tiny_student,
)

REPO = Path(__file__).resolve().parents[1]
TEXT = (
    "Sir Walter Elliot, of Kellynch Hall, in Somersetshire, was a man who, for his own amusement, never "
    "took up any book but the Baronetage; there he found occupation for an idle hour, and consolation in a "
    "distressed one."
)


@pytest.fixture(scope="module")
def student(tiny_tokenizer):
    return tiny_student(len(tiny_tokenizer), seed=1)


@pytest.fixture(scope="module")
def student_dir(student, tiny_tokenizer, tmp_path_factory):
    return save_model_dir(student, tiny_tokenizer, tmp_path_factory.mktemp("student"))


@pytest.fixture(scope="module")
def lm(student, tiny_tokenizer):
    return SpikeGPTLM(student, tokenizer=tiny_tokenizer, batch_size=3, max_length=32)


def _req(kind: str, args: tuple) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def _manual_logprob(model, ids: list[int], n_cont: int) -> tuple[float, bool]:
    """One full forward over ids: sum of log p of the last n_cont tokens, and whether each is the argmax."""
    with torch.no_grad():
        logits = model(torch.tensor([ids[:-1]])).logits[0].double()
    logp = logits.log_softmax(-1)[-n_cont:]
    target = torch.tensor(ids[-n_cont:])
    return float(logp.gather(1, target[:, None]).sum()), bool((logits[-n_cont:].argmax(-1) == target).all())


@pytest.mark.latest
def test_loglikelihood_matches_manual_and_is_greedy(lm, student, tiny_tokenizer):
    contexts = [
        "It is a truth",
        "To be, or not to be",
        "In the beginning God created the heaven and the earth",
    ]
    reqs = [_req("loglikelihood", (c, " universally acknowledged")) for c in contexts]
    # a greedy continuation: what the model itself predicts after the first context
    ctx_ids = tiny_tokenizer.encode(contexts[0])
    greedy_ids = student.generate(torch.tensor([ctx_ids]), max_new_tokens=3)[0, len(ctx_ids) :].tolist()
    greedy_text = tiny_tokenizer.decode(greedy_ids)
    reqs.append(_req("loglikelihood", (contexts[0], greedy_text)))
    got = lm.loglikelihood(reqs, disable_tqdm=True)
    for (ctx, cont), (lp, greedy) in zip([r.args for r in reqs], got):
        ctx_enc, cont_enc = lm._encode_pair(ctx, cont)
        want_lp, want_greedy = _manual_logprob(student, ctx_enc + cont_enc, len(cont_enc))
        assert lp == pytest.approx(want_lp, abs=1e-4)
        assert greedy == want_greedy
    if lm.tok_encode(contexts[0] + greedy_text)[len(ctx_ids) :] == greedy_ids:  # tokenization round-trips
        assert got[-1][1] is True
    assert got[0][1] is False  # a random model does not greedily produce this phrase


def test_loglikelihood_longer_than_max_length_streams(lm, student):
    """A request longer than max_length (32) is streamed through the state: still the full-sequence score."""
    ((lp, greedy),) = lm.loglikelihood([_req("loglikelihood", (TEXT, " and consolation"))], disable_tqdm=True)
    ctx_enc, cont_enc = lm._encode_pair(TEXT, " and consolation")
    assert len(ctx_enc) + len(cont_enc) > lm.max_length
    want_lp, want_greedy = _manual_logprob(student, ctx_enc + cont_enc, len(cont_enc))
    assert lp == pytest.approx(want_lp, abs=1e-4) and greedy == want_greedy


@pytest.mark.parametrize("mixer", ["srwkv", "sfsa", "hybrid_t2"])
def test_rolling_equals_full_sequence_loss(mixer, tiny_tokenizer):
    kw = (
        {"token_mixer": ["srwkv", "sfsa"], "time_steps": 2}
        if mixer == "hybrid_t2"
        else {"token_mixer": mixer}
    )
    student = tiny_student(len(tiny_tokenizer), seed=1, **kw)
    lm = SpikeGPTLM(student, tokenizer=tiny_tokenizer, max_length=32)
    tokens = lm.tok_encode(TEXT)
    assert len(tokens) > 4 * lm.max_length  # many chunks of the streaming pass
    (rolled,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", (TEXT,))], disable_tqdm=True)
    ids = [lm.prefix_token_id] + tokens
    want, _ = _manual_logprob(student, ids, len(tokens))
    assert rolled == pytest.approx(want, rel=1e-5)


def test_generate_until_stop_strings_and_max_tokens(lm, student, tiny_tokenizer):
    prompt = "It is a truth"
    free = lm.generate_until(
        [_req("generate_until", (prompt, {"until": ["<never>"], "max_gen_toks": 12}))], disable_tqdm=True
    )[0]
    ids = tiny_tokenizer.encode(prompt)
    own = student.generate(torch.tensor([ids]), max_new_tokens=12, eos_token_id=0)[0, len(ids) :].tolist()
    assert free == tiny_tokenizer.decode(own, skip_special_tokens=True)  # exactly 12 greedy tokens
    stop = free[len(free) // 2 :][:2]
    cut = lm.generate_until(
        [_req("generate_until", (prompt, {"until": [stop], "max_gen_toks": 12}))], disable_tqdm=True
    )[0]
    assert cut == free[: free.find(stop)]
    assert stop not in cut


@pytest.mark.latest
def test_simple_evaluate_instance_on_local_tasks(lm):
    res = run_tasks(lm, ["spikedistill_ppl_hamlet", "spikedistill_persuasion_cloze"], limit=2)
    ppl, mc = res["results"]["spikedistill_ppl_hamlet"], res["results"]["spikedistill_persuasion_cloze"]
    for key in ("bits_per_byte,none", "byte_perplexity,none", "word_perplexity,none"):
        assert ppl[key] > 0
    assert 0.0 <= mc["acc,none"] <= 1.0 and "acc_norm,none" in mc


def test_simple_evaluate_by_registered_name(student_dir):
    from lm_eval.tasks import TaskManager

    res = lm_eval.simple_evaluate(
        model="spikegpt",
        model_args=f"pretrained={student_dir},batch_size=4,max_length=512",
        tasks=["spikedistill_hamlet_next_line"],
        limit=2,
        log_samples=False,
        bootstrap_iters=10,
        task_manager=TaskManager(include_path=str(TASKS_DIR), include_defaults=False),
    )
    assert "acc,none" in res["results"]["spikedistill_hamlet_next_line"]


@pytest.mark.slow  # ~20 s: a fresh interpreter imports lm-eval and indexes its ~14k built-in task configs
def test_stock_lm_eval_cli_finds_spikegpt(student_dir, tmp_path):
    """`lm_eval --model spikegpt` via the start-up hook that `python -m eval.lm_eval_hook install` writes."""
    site = tmp_path / "site"
    site.mkdir()
    subprocess.run(
        [sys.executable, "-m", "eval.lm_eval_hook", "install", "--site-dir", str(site)],
        check=True,
        cwd=REPO,
        capture_output=True,
    )
    code = (
        "import site, sys; site.addsitedir(sys.argv[1]); sys.argv = ['lm_eval'] + sys.argv[2:]; "
        "from lm_eval.__main__ import cli_evaluate; cli_evaluate()"
    )
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            code,
            str(site),
            "--model",
            "spikegpt",
            "--model_args",
            f"pretrained={student_dir},batch_size=2,max_length=512",
            "--tasks",
            "spikedistill_ppl_hamlet",
            "--include_path",
            str(TASKS_DIR),
            "--limit",
            "1",
            "--output_path",
            str(out),
        ],
        check=False,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (result,) = out.rglob("results_*.json")
    assert "bits_per_byte,none" in json.loads(result.read_text())["results"]["spikedistill_ppl_hamlet"]


def test_evaluate_tasks_teacher_beside_student(student_dir, tiny_teacher_dir, tmp_path):
    out = evaluate_tasks(
        student_dir,
        ["spikedistill_ppl_persuasion"],
        tmp_path,
        limit=1,
        batch_size=4,
        teacher_spec=str(tiny_teacher_dir),
    )
    assert set(out["models"]) == {"student", "teacher"}
    for label in ("student", "teacher"):
        raw = json.loads(Path(out["files"][f"lm_eval_{label}"]).read_text())
        assert raw["results"]["spikedistill_ppl_persuasion"]["bits_per_byte,none"] > 0
    table = (tmp_path / "results.md").read_text()
    assert "| task | metric | student | teacher |" in table and "bits_per_byte" in table
    s = out["models"]["student"]["spikedistill_ppl_persuasion"]["bits_per_byte"]
    t = out["models"]["teacher"]["spikedistill_ppl_persuasion"]["bits_per_byte"]
    assert s != t  # two different models really were scored


def test_batched_scores_match_manual_for_t2_hybrid(tiny_tokenizer):
    """Right-padded batch, LM head on continuation positions only: same as one forward per request."""
    from eval.scoring import score_batch

    student = tiny_student(len(tiny_tokenizer), seed=1, token_mixer=["srwkv", "sfsa"], time_steps=2)
    pairs = [
        (tiny_tokenizer.encode("It is a truth"), tiny_tokenizer.encode(" universally")),
        (tiny_tokenizer.encode("To be, or not to be, that"), tiny_tokenizer.encode(" is the question")),
    ]
    for (ctx, cont), (lp, greedy) in zip(pairs, score_batch(student, pairs)):
        want_lp, want_greedy = _manual_logprob(student, ctx + cont, len(cont))
        assert lp == pytest.approx(want_lp, abs=1e-4) and greedy == want_greedy


def test_model_args_are_checked(student_dir):
    from eval import EvalError

    with pytest.raises(EvalError, match="unknown model_args \\['max_lenght'\\]"):
        SpikeGPTLM.create_from_arg_string(f"pretrained={student_dir},max_lenght=64")
    with pytest.raises(EvalError, match="dtype='bf17' is not a torch dtype"):
        SpikeGPTLM(str(student_dir), dtype="bf17")
    lm = SpikeGPTLM.create_from_arg_string(
        f"pretrained={student_dir},batch_size=5,dtype=bf16", {"batch_size": 1, "device": "cuda"}
    )
    assert lm.batch_size_per_gpu == 5 and next(lm.model.parameters()).dtype == torch.bfloat16
