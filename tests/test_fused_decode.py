"""The fused decode step (students/ops/decode_step, csrc/decode_ops.cpp): one C call per token for spike-driven
srwkv students with T = 1. It must equal the module path (SPIKEDISTILL_SPARSE=off: torch and the training
kernels, no code shared with the fused step) up to float summation order: the same spikes, the same state,
logits equal to fp32 tolerance and the same greedy tokens; interleaved with module-path forwards on the same
state it must still equal the parallel forward; and it must run only where it applies."""
from __future__ import annotations

import pytest
import torch

from students import SpikeGPTConfig, SpikeGPTForCausalLM, cache_kwargs, state_of
from students.ops import fused_decoder
from students.ops.csrc import library
from students.ops.decode_step import cpu as fused_cpu
from students.ops.decode_step import unsupported
from students.ops.event_linear import calibrate

pytestmark = pytest.mark.skipif(library() is None, reason="the CPU kernel library could not be built (no g++?)")

# (d_model, n_head, vocab): widths below one SIMD tile of output columns (48: C and every state), and ones with
# full tiles plus a partial one (FFN 192 = 128 + 64, vocab 1000 = 7 x 128 + 104; 512 and 2048 on AVX2).
SIZES = [(48, 2, 300), (128, 4, 1000)]


def make(d_model=48, n_head=2, vocab=300, seed=0, **kw) -> SpikeGPTForCausalLM:
    """A random 2-layer student whose LIFs fire at trained-like rates (~0.1-0.4): threshold 0.3 at init."""
    torch.manual_seed(seed)
    cfg = SpikeGPTConfig(vocab_size=vocab, n_layer=2, d_model=d_model, n_head=n_head, lif_threshold=0.3,
                         eos_token_id=None, bos_token_id=None, **kw)
    return SpikeGPTForCausalLM(cfg).eval()


def ids(shape, vocab, seed=1) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


class StepSpy:
    """Counts FusedDecoder.step calls and the rows of each."""

    def __init__(self, monkeypatch):
        self.rows = []
        real = fused_cpu.FusedDecoder.step

        def spy(decoder, input_ids, state, head_max_rate):
            self.rows.append(input_ids.shape[0])
            return real(decoder, input_ids, state, head_max_rate)

        monkeypatch.setattr(fused_cpu.FusedDecoder, "step", spy)


def set_tables(monkeypatch, small=(), large=()):
    """Inject this CPU's crossover tables (no measuring in tests)."""
    monkeypatch.setattr(calibrate, "_tables", {torch.get_num_threads(): {"small": small, "large": large}})


@torch.no_grad()
def decode(model, prompt, tokens):
    """Prefill `prompt` [B, L], then feed tokens [B, N] one per step inside model.decoding(): per step
    (logits [B, V], head input [B, C]), and the final state."""
    state = state_of(model(prompt, use_cache=True))
    steps = []
    with model.decoding():
        for tok in tokens.unbind(1):
            out = model(tok[:, None], use_cache=True, **cache_kwargs(state))
            steps.append((out.logits[:, 0], out.head_input[:, 0]))
    return steps, state


def flat_state(state) -> dict[str, torch.Tensor]:
    out = {}
    for key, value in state.tensors.items():
        for i, t in enumerate(value if isinstance(value, tuple) else (value,)):
            out[f"{key}.{i}"] = t.reshape(t.shape[0], -1)
    return out


VARIANTS = [{"lif_reset": "soft"}, {"lif_decay_input": False}, {"lif_tau": 3.0}, {"binary_embedding": False}]


@pytest.mark.parametrize("d_model,n_head,vocab,variant", [(*size, {}) for size in SIZES] + [(*SIZES[0], v) for v in VARIANTS],
                         ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else str(v))
def test_fused_steps_equal_the_module_path(d_model, n_head, vocab, variant, monkeypatch):
    """Every LIF charge kind (tau 2, tau 3, no input decay) and reset, and a float embedding."""
    model = make(d_model, n_head, vocab, **variant)
    prompt, tokens = ids((2, 7), vocab), ids((2, 12), vocab, seed=2)
    monkeypatch.setenv("SPIKEDISTILL_SPARSE", "off")
    dense, dense_state = decode(model, prompt, tokens)
    monkeypatch.setenv("SPIKEDISTILL_SPARSE", "on")
    spy = StepSpy(monkeypatch)
    fused, fused_state = decode(model, prompt, tokens)
    assert spy.rows == [2] * 12
    rates = torch.stack([h for _, h in dense]).mean()
    assert 0.1 < rates < 0.6  # the head reads a trained-like share of spikes, not an all-silent input
    for (logits_d, head_d), (logits_f, head_f) in zip(dense, fused):
        assert torch.equal(head_f, head_d)  # the same spikes
        torch.testing.assert_close(logits_f, logits_d, rtol=1e-5, atol=1e-5)
    d, f = flat_state(dense_state), flat_state(fused_state)
    assert d.keys() == f.keys() and fused_state.seen_tokens == dense_state.seen_tokens == 19
    for key in d:
        torch.testing.assert_close(f[key], d[key], rtol=1e-5, atol=1e-5, msg=key)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_greedy_tokens_are_identical(seed, monkeypatch):
    model = make(128, 4, 1000, seed=seed)
    prompt = ids((1, 9), 1000, seed=seed)
    monkeypatch.setenv("SPIKEDISTILL_SPARSE", "off")
    dense = model.generate(prompt, max_new_tokens=24, do_sample=False)
    monkeypatch.delenv("SPIKEDISTILL_SPARSE")
    set_tables(monkeypatch, large=((4, 0.9),))  # auto mode, this CPU's tables as if measured
    spy = StepSpy(monkeypatch)
    fused = model.generate(prompt, max_new_tokens=24, do_sample=False)
    assert torch.equal(fused, dense)
    assert spy.rows == [1] * 23  # every decode step after the prefill


def test_fused_and_module_forwards_continue_one_state(monkeypatch):
    """Fused steps, a 3-token module-path forward, fused steps again on one state: the logits of the parallel
    forward over the whole sequence (the state's entries change between the two paths: they rebind)."""
    monkeypatch.setenv("SPIKEDISTILL_SPARSE", "on")
    model = make(128, 4, 1000)
    seq = ids((2, 16), 1000)
    with torch.no_grad():
        full = model(seq).logits
        state = state_of(model(seq[:, :5], use_cache=True))
        got = []
        with model.decoding():
            for t in range(5, 16):
                if t == 8:
                    got.append(model(seq[:, 8:11], use_cache=True, **cache_kwargs(state)).logits)
                elif not 8 < t < 11:
                    got.append(model(seq[:, t : t + 1], use_cache=True, **cache_kwargs(state)).logits)
    torch.testing.assert_close(torch.cat(got, 1), full[:, 5:], rtol=1e-5, atol=1e-5)


def test_head_above_the_crossover_runs_dense(monkeypatch):
    model = make(128, 4, 1000)
    prompt, tokens = ids((1, 6), 1000), ids((1, 8), 1000, seed=3)
    monkeypatch.setenv("SPIKEDISTILL_SPARSE", "off")
    dense, _ = decode(model, prompt, tokens)
    monkeypatch.delenv("SPIKEDISTILL_SPARSE")
    set_tables(monkeypatch, small=((1, 0.1),))
    monkeypatch.setattr(fused_cpu, "MIN_WEIGHTS", 1)  # the 128 x 1000 head is measured: rate limit 0.1
    statuses, real = [], library().decode_step
    monkeypatch.setattr(library(), "decode_step", lambda *args: statuses.append(real(*args)) or statuses[-1])
    fused, _ = decode(model, prompt, tokens)
    assert statuses == [1] * 8  # every step's head fires above 0.1: the C step leaves the head to the matmul
    for (logits_d, head_d), (logits_f, head_f) in zip(dense, fused):
        assert torch.equal(head_f, head_d)
        torch.testing.assert_close(logits_f, logits_d, rtol=1e-5, atol=1e-5)


def test_the_head_on_two_threads(monkeypatch):
    """A head large enough for two OpenMP threads (two rows of ~16-40 spikes x 30,000 columns > 2 x 2^18 adds)."""
    model = make(128, 4, 30000)
    prompt, tokens = ids((2, 6), 30000), ids((2, 4), 30000, seed=5)
    monkeypatch.setenv("SPIKEDISTILL_SPARSE", "off")
    dense, _ = decode(model, prompt, tokens)
    monkeypatch.setenv("SPIKEDISTILL_SPARSE", "on")
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        fused, _ = decode(model, prompt, tokens)
    finally:
        torch.set_num_threads(before)
    for (logits_d, head_d), (logits_f, head_f) in zip(dense, fused):
        assert torch.equal(head_f, head_d) and head_f.sum() * 30000 > 2 * (1 << 18)
        torch.testing.assert_close(logits_f, logits_d, rtol=1e-5, atol=1e-5)


def test_auto_mode_runs_up_to_the_calibrated_rows(monkeypatch):
    monkeypatch.delenv("SPIKEDISTILL_SPARSE", raising=False)
    model = make()
    set_tables(monkeypatch, small=((1, 0.3),))  # the event path wins up to one row only
    spy = StepSpy(monkeypatch)
    decode(model, ids((2, 4), 300), ids((2, 3), 300))
    assert spy.rows == []  # two rows: the module path
    set_tables(monkeypatch, small=((4, 0.3),))
    decode(model, ids((2, 4), 300), ids((2, 3), 300))
    assert spy.rows == [2, 2, 2]
    set_tables(monkeypatch)  # the event path never wins here: one row still takes the fused step
    decode(model, ids((2, 4), 300), ids((2, 3), 300))
    decode(model, ids((1, 4), 300), ids((1, 3), 300))
    assert spy.rows == [2, 2, 2, 1, 1, 1]


@pytest.mark.parametrize(
    "overrides,reason",
    [({"token_mixer": "sfsa"}, "srwkv"), ({"token_mixer": ["srwkv", "sfsa_linear"]}, "srwkv"),
     ({"time_steps": 2}, "time_steps"), ({"spike_driven": False}, "spike_driven")],
    ids=["sfsa", "hybrid", "T=2", "not spike-driven"],
)
def test_unsupported_models_take_the_module_path(overrides, reason, monkeypatch):
    monkeypatch.setenv("SPIKEDISTILL_SPARSE", "on")
    model = make(**overrides)
    assert reason in unsupported(model) and fused_decoder(model) is None
    spy = StepSpy(monkeypatch)
    prompt = ids((1, 5), 300)
    sparse = model.generate(prompt, max_new_tokens=6, do_sample=False)
    monkeypatch.setenv("SPIKEDISTILL_SPARSE", "off")
    assert torch.equal(sparse, model.generate(prompt, max_new_tokens=6, do_sample=False)) and spy.rows == []


def test_other_dtypes_biases_and_the_reference_backend_are_refused(monkeypatch):
    model = make()
    assert unsupported(model) is None
    assert "fp32" in unsupported(make().to(torch.bfloat16))
    with_bias = make()
    with_bias.blocks[0].ffn.key.bias = torch.nn.Parameter(torch.zeros(192))
    assert "without a bias" in unsupported(with_bias)
    monkeypatch.setenv("SPIKEDISTILL_KERNELS", "reference")
    assert "library" in unsupported(model)
    monkeypatch.delenv("SPIKEDISTILL_KERNELS")
    monkeypatch.setenv("SPIKEDISTILL_SPARSE", "off")
    assert fused_decoder(model) is None


def test_a_token_outside_the_vocabulary_raises_and_leaves_the_state(monkeypatch):
    monkeypatch.setenv("SPIKEDISTILL_SPARSE", "on")
    model = make()
    with torch.no_grad():
        state = state_of(model(ids((1, 4), 300), use_cache=True))
        with model.decoding():
            model(ids((1, 1), 300), use_cache=True, **cache_kwargs(state))  # binds the state
            before = {k: v.clone() for k, v in flat_state(state).items()}
            with pytest.raises(IndexError):
                model(torch.tensor([[300]]), use_cache=True, **cache_kwargs(state))
    assert state.seen_tokens == 5
    for key, value in flat_state(state).items():
        assert torch.equal(value, before[key]), key
