"""The student under the installed transformers release.

transformers 5.24 renamed the model-output field and forward argument `past_key_values` to `cache` (a
ModelOutput subclass that declared the old name could no longer be built: every fresh install broke). These
tests check, for every mixer: the output field has the name transformers' own outputs use, callers may pass
the state under either name, generate and save/load work, and our own code logs no deprecation warning.
Marked `latest`: part of the drift check `make test-latest`, which runs them on the newest releases.
"""

import logging
from dataclasses import fields

import pytest
import torch
from transformers import AutoModelForCausalLM
from transformers.modeling_outputs import CausalLMOutputWithPast

import students
from eval.scoring import stream_logprobs
from students import CACHE_FIELD, SpikeGPTConfig, SpikeGPTForCausalLM, SpikeGPTState, StudentError, state_of

pytestmark = pytest.mark.latest

MIXERS = ["srwkv", "sfsa", "sfsa_linear"]
VOCAB = 40


def make(mixer: str) -> SpikeGPTForCausalLM:
    torch.manual_seed(0)
    cfg = SpikeGPTConfig.from_preset("tiny", vocab_size=VOCAB, d_model=16, n_head=2, token_mixer=mixer)
    return SpikeGPTForCausalLM(cfg).eval()


def ids(length: int = 12) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, length), generator=torch.Generator().manual_seed(3))


class DeprecationLog(logging.Handler):
    """Collects transformers' deprecation messages (logged once per process: the once-cache is cleared)."""

    def __init__(self):
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record):
        if "deprecated" in record.getMessage().lower():
            self.messages.append(record.getMessage())

    def __enter__(self):
        logging.Logger.warning_once.cache_clear()  # transformers' warning_once is an lru_cache on Logger
        logging.getLogger("transformers").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("transformers").removeHandler(self)


def test_cache_field_is_the_name_transformers_uses():
    own = {f.name for f in fields(CausalLMOutputWithPast)}
    assert CACHE_FIELD in own
    assert ({"cache", "past_key_values"} - {CACHE_FIELD}).isdisjoint(own)
    assert CACHE_FIELD in {f.name for f in fields(students.SpikeGPTCausalLMOutput)}


@pytest.mark.parametrize("mixer", MIXERS)
@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_state_passes_under_either_name(mixer, name):
    model, x = make(mixer), ids()
    with torch.no_grad():
        full = model(x).logits
        first = model(x[:, :5], use_cache=True)
        state = state_of(first)
        assert isinstance(state, SpikeGPTState) and state.get_seq_length() == 5
        assert first[CACHE_FIELD] is state and first.to_tuple()[1] is state  # (logits, cache, head_input)
        rest = model(x[:, 5:], use_cache=True, **{name: state})
    torch.testing.assert_close(torch.cat([first.logits, rest.logits], 1), full, rtol=1e-5, atol=1e-5)
    assert state_of(rest) is state and state.get_seq_length() == x.shape[1]


def test_both_names_at_once_is_an_error():
    model, x = make("srwkv"), ids()
    state = state_of(model(x[:, :3], use_cache=True))
    with pytest.raises(StudentError, match="not both"):
        model(x[:, 3:], cache=state, past_key_values=SpikeGPTState())


def test_no_cache_without_use_cache():
    out = make("srwkv")(ids())
    assert state_of(out) is None and CACHE_FIELD not in out


@pytest.mark.parametrize("mixer", MIXERS)
def test_generate_is_greedy_over_full_forwards(mixer):
    model, prompt = make(mixer), ids(6)[:1]
    with torch.no_grad():
        # eos_token_id=None: the loop below does not stop at the config's eos (id 0), so generate must not either
        out = model.generate(prompt, max_new_tokens=5, do_sample=False, eos_token_id=None)
        expected = prompt
        for _ in range(5):  # independent: recompute the whole sequence each step, no state
            nxt = model(expected).logits[:, -1].argmax(-1, keepdim=True)
            expected = torch.cat([expected, nxt], 1)
    assert torch.equal(out, expected)


@pytest.mark.parametrize("mixer", MIXERS)
def test_save_and_load_round_trip(mixer, tmp_path):
    model, x = make(mixer), ids()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert type(loaded) is SpikeGPTForCausalLM
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)


def test_our_code_logs_no_deprecation_warning(tmp_path):
    model, x = make("sfsa"), ids()
    with DeprecationLog() as log, torch.no_grad():
        first = model(x[:, :4], use_cache=True)
        model(x[:, 4:], use_cache=True, cache=state_of(first))
        model.generate(x[:1, :4], max_new_tokens=3)
        stream_logprobs(model, x[0].tolist(), chunk_size=5)
        model.save_pretrained(tmp_path)
        AutoModelForCausalLM.from_pretrained(tmp_path)
    assert log.messages == []


@pytest.mark.skipif(CACHE_FIELD != "cache", reason="only releases that renamed the field warn on the old name")
def test_the_deprecation_check_sees_an_old_name_read():
    out = make("srwkv")(ids(), use_cache=True)
    with DeprecationLog() as log:
        assert out.past_key_values is state_of(out)  # what a caller of the old API still gets, with a warning
    assert log.messages, "the handler did not see transformers' deprecation warning"


RECIPE = """\
run: {{name: smoke, seed: 0}}
data: {{sources: [{corpus}], seq_len: 16, val_fraction: 0.1}}
teacher: {{spec: {teacher}, dtype: fp32}}
student: {{preset: tiny, config: {{n_layer: 2, d_model: 16, n_head: 2, token_mixer: [srwkv, sfsa]}}}}
teacher_cache: {{enabled: true, k: 4, value_dtype: fp32, batch_size: 4}}
align:
  train: {{steps: 2, batch_size: 2, eval_every: 2, eval_batches: 1, checkpoint_every: 2, log_every: 1}}
distill:
  train: {{steps: 2, batch_size: 2, eval_every: 2, eval_batches: 1, checkpoint_every: 2, log_every: 1}}
evaluate: {{texts: [persuasion], max_text_bytes: 300, context_length: 32, energy: true, teacher: true,
           sample_tokens: 2}}
"""


def test_a_tiny_run_through_every_stage(tmp_path, tiny_teacher_dir):
    import json

    from pipeline.cli import main

    (tmp_path / "corpus.txt").write_text("It is a truth universally acknowledged, that a single man. " * 40)
    recipe = tmp_path / "smoke.yaml"
    recipe.write_text(RECIPE.format(corpus=tmp_path / "corpus.txt", teacher=tiny_teacher_dir))
    run_dir = tmp_path / "run"
    with DeprecationLog() as log:
        assert main(["run", str(recipe), "--run-dir", str(run_dir)]) == 0
    stages = ("prepare", "teacher_cache", "align", "distill", "export", "evaluate")
    for stage in stages:
        assert json.loads((run_dir / stage / "done.json").read_text())["stage"] == stage
    results = json.loads((run_dir / "evaluate" / "results.json").read_text())
    assert results["student"]["bpb"]["persuasion"]["bits_per_byte"] > 0
    model = AutoModelForCausalLM.from_pretrained(run_dir / "export" / "model")
    assert type(model) is SpikeGPTForCausalLM and model.config.layer_mixers == ["srwkv", "sfsa"]
    assert log.messages == []
