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

from eval.harness import TASKS_DIR, SpikeGPTLM, WindowedHFLM, evaluate_tasks, run_tasks
from eval.testing import bos_tokenizer, save_model_dir, tiny_llama, tiny_student

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
    lm = SpikeGPTLM(student, tokenizer=tiny_tokenizer, max_length=32, rolling="stream")
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


def _hooked_site(tmp_path) -> Path:
    """A site-packages folder holding only the start-up hook `python -m eval.lm_eval_hook install` writes."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "eval.lm_eval_hook", "install", "--site-dir", str(site)],
        check=True,
        cwd=REPO,
        capture_output=True,
    )
    return site


def _python_with_hook(site: Path, code: str, *args: str, cwd) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter whose site-packages include `site` (the .pth hook runs first), with
    the worktree on the path (as the editable install puts it)."""
    prelude = "import site, sys; site.addsitedir(sys.argv[1]); sys.argv = ['lm_eval'] + sys.argv[2:]; "
    return subprocess.run(
        [sys.executable, "-c", prelude + code, str(site), *args],
        check=False,
        cwd=cwd,
        capture_output=True,
        text=True,
        env=os.environ | {"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"},
    )


def test_hook_keeps_lm_eval_builtin_models(tmp_path):
    """With the hook installed, lm-eval's registry still loads its own models (hf, dummy) and has spikegpt."""
    code = (
        "from lm_eval.api.registry import get_model; "
        "print(get_model('dummy').__name__, get_model('hf').__name__, get_model('spikegpt').__name__)"
    )
    proc = _python_with_hook(_hooked_site(tmp_path), code, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["DummyLM", "HFLM", "SpikeGPTLM"]


def test_importing_the_adapter_keeps_lm_eval_builtin_models(monkeypatch):
    """`import eval.harness` (which registers spikegpt) into a fresh, empty registry, then lm-eval's own
    `hf` and `dummy` are still found (lm-eval loads its built-ins only while the registry is empty)."""
    import importlib

    from lm_eval.api import registry

    import eval.harness

    monkeypatch.setattr(registry.model_registry, "_objs", {})  # what a fresh interpreter starts with
    monkeypatch.delitem(sys.modules, "lm_eval.models")  # so importing it registers the built-ins again
    importlib.reload(eval.harness)
    assert registry.get_model("dummy").__name__ == "DummyLM"
    assert registry.get_model("hf").__name__ == "HFLM"
    assert registry.get_model("spikegpt").__name__ == "SpikeGPTLM"


def _cli_args(out: Path, model: str, model_args: str | None) -> list[str]:
    return ["--model", model] + (["--model_args", model_args] if model_args else []) + [
        "--tasks", "spikedistill_ppl_hamlet", "--include_path", str(TASKS_DIR), "--limit", "1",
        "--output_path", str(out)]


@pytest.mark.slow  # ~20 s: a fresh interpreter imports lm-eval and indexes its ~14k built-in task configs
def test_stock_lm_eval_cli_with_the_hook(student_dir, tmp_path):
    """The stock `lm_eval` command, with the hook that `make` installs: lm-eval's own `--model dummy` still
    works (the hook must not hide lm-eval's built-in models), and `--model spikegpt` finds our adapter. Both
    commands run in one fresh interpreter, one after the other (lm-eval's CLI reads sys.argv each time), so
    its import and task index are paid once."""
    runs = {"dummy": None, "spikegpt": f"pretrained={student_dir},batch_size=2,max_length=512"}
    argvs = {model: _cli_args(tmp_path / f"out_{model}", model, args) for model, args in runs.items()}
    code = ("import json, sys; from lm_eval.__main__ import cli_evaluate\n"
            "for argv in json.loads(sys.argv[1]):\n"
            "    sys.argv = ['lm_eval'] + argv\n"
            "    cli_evaluate()\n")
    proc = _python_with_hook(_hooked_site(tmp_path), code, json.dumps(list(argvs.values())), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for model in runs:
        (result,) = (tmp_path / f"out_{model}").rglob("results_*.json")
        assert "bits_per_byte,none" in json.loads(result.read_text())["results"]["spikedistill_ppl_hamlet"], model


# ---------------------------------------------------------------- BOS: exactly one for BOS-adding tokenizers

LAMPS = "The lamps were lit early and the road grew soft."


def _input_recorder(model) -> list[torch.Tensor]:
    """The input_ids of every forward of `model` from now on."""
    seen: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        seen.append(kwargs["input_ids"] if "input_ids" in kwargs else args[0])

    model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen


@pytest.fixture(scope="module", params=["bos", "plain"])
def tokenizer_case(request, tiny_tokenizer):
    """(tokenizer, adds BOS?) pairs: a Llama-style BOS-adding tokenizer and the plain tiny one."""
    return (bos_tokenizer(), True) if request.param == "bos" else (tiny_tokenizer, False)


def test_bos_loglikelihood_by_hand(tokenizer_case):
    tok, adds = tokenizer_case
    model = tiny_llama(len(tok), seed=2)
    lm = SpikeGPTLM(model, tokenizer=tok, max_length=64, batch_size=1)  # unpadded: every input id is real
    context, continuation = "The lamps were lit early", " and the road grew soft."
    seen = _input_recorder(model)
    (lp, _), (lp_empty, _) = lm.loglikelihood(
        [_req("loglikelihood", (context, continuation)), _req("loglikelihood", ("", LAMPS))], disable_tqdm=True
    )
    seen = list(seen)
    whole = tok.encode(context + continuation, add_special_tokens=False)
    n_cont = len(whole) - len(tok.encode(context, add_special_tokens=False))
    lead = [tok.bos_token_id] if adds else []
    want, _ = _manual_logprob(model, lead + whole, n_cont)
    assert lp == pytest.approx(want, abs=1e-4)
    # an empty context is conditioned on the prefix token alone, once
    doc = tok.encode(LAMPS, add_special_tokens=False)
    want_empty, _ = _manual_logprob(model, [lm.prefix_token_id] + doc, len(doc))
    assert lp_empty == pytest.approx(want_empty, abs=1e-4)
    assert len(seen) == 2
    for ids in seen:  # BOS-adding: one BOS each; plain: only the empty context's prefix token (= BOS here)
        bos_count = int((ids[0] == tok.bos_token_id).sum())
        assert bos_count == (1 if adds else int(ids[0, 0] == lm.prefix_token_id))


@pytest.mark.parametrize("stream", [True, False])
def test_bos_rolling_by_hand(tokenizer_case, stream, tiny_tokenizer):
    """The issue's small input: every document token scored once, after exactly one prefix token. (With a
    BOS-adding tokenizer the old code scored [bos, bos, ...]: one token too many, and a higher NLL.)"""
    tok, adds = tokenizer_case
    model = tiny_student(len(tok), seed=2) if stream else tiny_llama(len(tok), seed=2)
    lm = SpikeGPTLM(model, tokenizer=tok, max_length=64)
    (value,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", (LAMPS,))], disable_tqdm=True)
    doc = tok.encode(LAMPS, add_special_tokens=False)
    prefix = tok.bos_token_id  # both tokenizers have one: lm-eval conditions a document on it
    want, _ = _manual_logprob(model, [prefix] + doc, len(doc))
    assert value == pytest.approx(want, rel=1e-5)
    if adds:
        doubled, _ = _manual_logprob(model, [prefix] + tok.encode(LAMPS), len(doc) + 1)
        assert value != pytest.approx(doubled, rel=1e-3)


def test_bos_rolling_windowed_hf(tokenizer_case):
    """lm-eval's hf model with our rolling protocol: each window led by one BOS, each token scored once."""
    tok, _ = tokenizer_case
    model = tiny_llama(len(tok), seed=3)
    lm = WindowedHFLM(pretrained=model, tokenizer=tok, max_length=8, batch_size=1, rolling_stride=8)
    seen = _input_recorder(model)
    (value,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", (LAMPS,))], disable_tqdm=True)
    seen = list(seen)  # the model's inputs during the rolling call only
    doc = tok.encode(LAMPS, add_special_tokens=False)
    want = sum(_manual_logprob(model, [tok.bos_token_id] + doc[i : i + 8], len(doc[i : i + 8]))[0]
               for i in range(0, len(doc), 8))  # disjoint windows of 8 tokens, each after one BOS
    assert value == pytest.approx(want, rel=1e-5)
    assert len(seen) == -(-len(doc) // 8)
    for ids in seen:
        assert ids[0, 0] == tok.bos_token_id and int((ids[0] == tok.bos_token_id).sum()) == 1


def test_bos_generation_prompt(tokenizer_case):
    tok, adds = tokenizer_case
    model = tiny_llama(len(tok), seed=4)
    lm = SpikeGPTLM(model, tokenizer=tok, max_length=64)
    seen = _input_recorder(model)
    lm.generate_until([_req("generate_until", (LAMPS, {"until": ["<never>"], "max_gen_toks": 2}))],
                      disable_tqdm=True)
    prompt = seen[0][0].tolist()
    body = tok.encode(LAMPS, add_special_tokens=False)
    assert prompt == ([tok.bos_token_id] if adds else []) + body


CLERK = "The clerk typed <|endoftext|> into the form."


def test_text_that_spells_a_special_token_is_scored_as_text(tokenizer_case):
    """The issue's document, with both tokenizers: `spikegpt` (rolling and loglikelihood, on a student) and
    `WindowedHFLM` (on a Llama) score the literal tokens of "<|endoftext|>" typed in the text, never the
    separator id, and a generation prompt holds the same literal tokens (on today's main id 0 was scored)."""
    tok, adds = tokenizer_case
    sep = tok.convert_tokens_to_ids("<|endoftext|>")
    doc = tok(CLERK, add_special_tokens=False, split_special_tokens=True).input_ids
    assert sep not in doc and tok.decode(doc) == CLERK  # the literal tokens: no separator, the text back whole
    context, continuation = "The clerk typed", CLERK[len("The clerk typed"):]
    whole = tok(CLERK, add_special_tokens=False, split_special_tokens=True).input_ids
    n_cont = len(whole) - len(tok(context, add_special_tokens=False).input_ids)
    lead = [tok.bos_token_id] if adds else []
    student, llama = tiny_student(len(tok), seed=2), tiny_llama(len(tok), seed=2)
    lms = [(student, SpikeGPTLM(student, tokenizer=tok, max_length=64)),
           (llama, WindowedHFLM(pretrained=llama, tokenizer=tok, max_length=64, batch_size=1))]
    for model, lm in lms:
        (rolling,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", (CLERK,))], disable_tqdm=True)
        assert rolling == pytest.approx(_manual_logprob(model, [tok.bos_token_id] + doc, len(doc))[0], rel=1e-5)
        ((lp, _),) = lm.loglikelihood([_req("loglikelihood", (context, continuation))], disable_tqdm=True)
        assert lp == pytest.approx(_manual_logprob(model, lead + whole, n_cont)[0], abs=1e-4)
    seen = _input_recorder(student)
    lms[0][1].generate_until([_req("generate_until", (CLERK, {"until": ["<never>"], "max_gen_toks": 1}))],
                             disable_tqdm=True)
    assert seen[0][0].tolist() == lead + doc


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


@pytest.mark.parametrize("spelled, cap, want", [("auto", None, 8), ("auto:4", None, 8), ("auto", 3, 3),
                                                ("16", None, 16), (2, None, 2)])
def test_lm_eval_batch_size_spellings_on_cpu(student_dir, spelled, cap, want):
    """`--batch_size auto` and `auto:4` (a traceback on today's main) and `dtype=auto`, as lm-eval's hf takes
    them; on a CPU "auto" is the documented fixed 8, capped by max_batch_size."""
    lm = SpikeGPTLM.create_from_arg_string(f"pretrained={student_dir},dtype=auto",
                                           {"batch_size": spelled, "max_batch_size": cap, "device": "cpu"})
    assert lm.batch_size_per_gpu == want and next(lm.model.parameters()).dtype == torch.float32


def test_dtype_auto_keeps_the_saved_dtype(student, tiny_tokenizer, tmp_path):
    folder = save_model_dir(tiny_student(len(tiny_tokenizer), seed=1).to(torch.bfloat16), tiny_tokenizer, tmp_path)
    assert next(SpikeGPTLM(str(folder), dtype="auto").model.parameters()).dtype == torch.bfloat16


def test_auto_batch_size_on_a_gpu_backs_off_like_hf():
    """On a GPU "auto" starts at max_batch_size (64) and multiplies by 0.9 after each out-of-memory probe
    (hand count, int(x * 0.9): 64 57 51 45 40 36 32 28 25 22 19), as lm-eval's hf does through accelerate."""
    from eval import EvalError
    from eval.harness import batch_size_of

    tried = []

    def probe(limit):
        def run(size):
            tried.append(size)
            if size > limit:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return run

    cuda = torch.device("cuda")
    assert batch_size_of("auto", None, cuda, probe(20)) == 19
    assert tried == [64, 57, 51, 45, 40, 36, 32, 28, 25, 22, 19]
    assert batch_size_of("auto:4", 16, cuda, probe(20)) == 16
    assert batch_size_of("auto", None, cuda, probe(0)) == 1
    for bad in ("auto:x", "0", "big", "-3"):
        with pytest.raises(EvalError, match="use a positive integer, auto or auto:N"):
            batch_size_of(bad, None, cuda, probe(20))
