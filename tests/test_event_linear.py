"""The event-driven linear layer (students/ops/event_linear): gather-add parity with the dense matmul, its
dispatch (SPIKEDISTILL_SPARSE, gradients, dtypes), the cached W^T, and that generate(), `spikedistill generate`,
streaming bits/byte and the lm-eval adapter really take it (generate's decode steps through the fused decode
step, tests/test_fused_decode.py). The calibrated size and rate limits: tests/test_event_calibration.py."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from lm_eval.api.instance import Instance

from eval.bpb import evaluate_bpb
from eval.cli import main as eval_main
from eval.harness import SpikeGPTLM
from eval.testing import save_model_dir, tiny_student
from students.layers import SpikeLinear
from students.ops import event_linear
from students.ops.csrc import library
from students.ops.decode_step.cpu import FusedDecoder
from students.ops.event_linear import calibrate
from students.ops.event_linear import cpu as event_cpu
from students.ops.event_linear.cpu import event_linear_cpu

pytestmark = pytest.mark.skipif(library() is None, reason="the CPU kernel library could not be built (no g++?)")


def _spikes(shape, rate, seed=0):
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < rate).float()


def _truth(x, w, b=None):
    """float64 dense matmul: the independent reference."""
    y = x.double() @ w.double().t()
    return y if b is None else y + b.double()


def _assert_exact(y, x, w, b=None):
    """fp32 y equals the float64 matmul up to fp32 summation order."""
    torch.testing.assert_close(y.double(), _truth(x, w, b), rtol=1e-5, atol=1e-5)


# (input shape [..., in], out): one row, rows not a multiple of anything, 3-D input, in = 1, out below one
# SIMD tile, out one past a tile, wide outputs, several tiles plus a partial one.
SHAPES = [((1, 64), 128), ((7, 37), 5), ((2, 3, 50), 129), ((5, 1), 300), ((1, 33), 1), ((4, 200), 1000),
          ((300, 16), 70)]


@pytest.mark.parametrize("shape,out", SHAPES)
@pytest.mark.parametrize("rate", [0.05, 0.3, 0.9])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gather_add_matches_dense_fp32(shape, out, rate, with_bias):
    torch.manual_seed(1)
    x = _spikes(shape, rate)
    w = torch.randn(out, shape[-1])
    b = torch.randn(out) if with_bias else None
    y = event_linear_cpu(x, w.t().contiguous(), b)
    assert y is not None and y.shape == (*shape[:-1], out) and y.dtype == torch.float32
    _assert_exact(y, x, w, b)


@pytest.mark.parametrize("fill", [0.0, 1.0])
def test_all_zero_and_all_one_inputs(fill):
    w, b = torch.randn(130, 70), torch.randn(130)
    x = torch.full((3, 70), fill)
    y = event_linear_cpu(x, w.t().contiguous(), b)
    expected = b.double().expand(3, -1) if fill == 0.0 else (w.double().sum(1) + b.double()).expand(3, -1)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5)
    if fill == 0.0:
        assert torch.equal(y, b.expand(3, -1))  # nothing added: exactly the bias


def test_bf16_matches_the_dense_bf16_matmul():
    torch.manual_seed(2)
    x, w = _spikes((9, 130), 0.3, seed=3).bfloat16(), torch.randn(257, 130).bfloat16()
    y = event_linear_cpu(x, w.t().contiguous())
    assert y.dtype == torch.bfloat16
    exact = _truth(x, w)  # exact sum of the bf16 weights; both sides round it once to bf16
    torch.testing.assert_close(y.double(), exact, rtol=8e-3, atol=1e-6)
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w), rtol=8e-3, atol=1e-2)
    # fp32 weights with a bf16 input are accepted by the kernel (summed exactly in fp32)
    y32 = event_linear_cpu(x, w.float().t().contiguous())
    torch.testing.assert_close(y32.double(), exact, rtol=8e-3, atol=1e-6)


@pytest.mark.parametrize("bad", [0.5, 2.0, -1.0, float("nan"), float("inf")])
def test_non_binary_input_declines(bad):
    x = _spikes((4, 40), 0.3)
    x[2, 17] = bad
    assert event_linear_cpu(x, torch.randn(40, 8)) is None
    assert event_linear_cpu(x.bfloat16(), torch.randn(40, 8).bfloat16()) is None


def test_negative_zero_counts_as_no_spike():
    x = _spikes((2, 30), 0.4)
    x[x == 0] = -0.0
    w = torch.randn(11, 30)
    _assert_exact(event_linear_cpu(x, w.t().contiguous()), x, w)


def test_rate_above_max_rate_declines():
    x = torch.zeros(4, 100)
    x[:, :30] = 1.0  # rate 0.3
    wt = torch.randn(100, 10)
    assert event_linear_cpu(x, wt, max_rate=0.29) is None
    assert event_linear_cpu(x, wt, max_rate=0.3) is not None


class _Spy:
    """Wraps event_linear_cpu and records (rows, out, took the event path) per call."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = event_cpu.event_linear_cpu

        def spy(x, weight_t, bias=None, max_rate=1.0):
            y = real(x, weight_t, bias, max_rate)
            self.calls.append((x.numel() // weight_t.shape[0], weight_t.shape[1], y is not None))
            return y

        monkeypatch.setattr(event_cpu, "event_linear_cpu", spy)

    def taken(self, out=None):
        return [c for c in self.calls if c[2] and (out is None or c[1] == out)]


def test_dispatch_modes_gradients_and_dtypes(monkeypatch):
    spy = _Spy(monkeypatch)
    x, w = _spikes((2, 64), 0.2), torch.randn(32, 64)
    monkeypatch.setenv("SPIKEDISTILL_SPARSE", "on")
    with torch.no_grad():
        _assert_exact(event_linear(x, w), x, w)
    assert len(spy.taken()) == 1
    # a gradient is needed -> dense (and the gradient is right)
    wg = w.clone().requires_grad_()
    event_linear(x, wg).sum().backward()
    torch.testing.assert_close(wg.grad, x.sum(0).expand(32, -1))
    # fp64 (gradcheck), mixed dtypes, SPIKEDISTILL_KERNELS=reference -> dense, kernel not called
    with torch.no_grad():
        event_linear(x.double(), w.double())
        with pytest.raises(RuntimeError):
            event_linear(x.bfloat16(), w)  # the dense matmul's own dtype error, as with nn.Linear
        with pytest.raises(RuntimeError):
            event_linear(x.reshape(4, 32), w)  # and its shape error (4 x 32 would reshape to 2 rows of 64)
        monkeypatch.setenv("SPIKEDISTILL_KERNELS", "reference")
        event_linear(x, w)
        monkeypatch.delenv("SPIKEDISTILL_KERNELS")
        monkeypatch.setenv("SPIKEDISTILL_SPARSE", "off")
        event_linear(x, w)
    assert len(spy.calls) == 1
    monkeypatch.setenv("SPIKEDISTILL_SPARSE", "sometimes")
    with pytest.raises(ValueError, match="SPIKEDISTILL_SPARSE"):
        event_linear(x, w)


def test_event_weight_follows_the_weight(monkeypatch):
    monkeypatch.setenv("SPIKEDISTILL_SPARSE", "on")
    layer = SpikeLinear(40, 24, binary_input=True)
    x = _spikes((3, 40), 0.3)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    with torch.no_grad():
        y0 = layer(x)
    assert layer._event_weight._wt is not None  # the event path ran and cached W^T
    layer.weight.grad = torch.ones_like(layer.weight)
    opt.step()  # in place: the version counter moves, W^T is rebuilt
    with torch.no_grad():
        _assert_exact(layer(x), x, layer.weight)
        assert not torch.allclose(layer(x), y0)
        layer.to(torch.bfloat16)  # new storage and dtype
        torch.testing.assert_close(layer(x.bfloat16()), torch.nn.functional.linear(x.bfloat16(), layer.weight))
    twin = copy.deepcopy(layer)
    with torch.no_grad():
        torch.testing.assert_close(twin(x.bfloat16()), layer(x.bfloat16()))
        layer.weight.data = torch.zeros_like(layer.weight)  # a new storage (version counter unchanged): seen
        assert layer(x.bfloat16()).abs().sum() == 0
    copied = pickle.loads(pickle.dumps(twin))  # a used layer pickles (torch.save of a whole module)
    assert copied._event_weight._wt is None and torch.equal(copied.weight, twin.weight)


def test_event_path_uses_the_layer_cache(monkeypatch):
    monkeypatch.setenv("SPIKEDISTILL_SPARSE", "on")
    layer = SpikeLinear(40, 24, binary_input=True)
    with torch.no_grad():
        layer(_spikes((1, 40), 0.3))
        first = layer._event_weight._wt
        layer(_spikes((1, 40), 0.3, seed=5))
    assert first is not None and layer._event_weight._wt is first  # built once, reused


# ---- the model and the inference paths ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def student(tiny_tokenizer):
    return tiny_student(len(tiny_tokenizer), seed=4)


@pytest.fixture(scope="module")
def student_dir(student, tiny_tokenizer, tmp_path_factory):
    return save_model_dir(student, tiny_tokenizer, tmp_path_factory.mktemp("event_student"))


def _binary_layers(model):
    return {m.out_features for m in model.modules() if isinstance(m, SpikeLinear) and m.binary_input}


def test_model_forward_equals_dense(student, monkeypatch):
    ids = torch.randint(0, student.config.vocab_size, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        monkeypatch.setenv("SPIKEDISTILL_SPARSE", "off")
        dense = student(ids).logits
        monkeypatch.setenv("SPIKEDISTILL_SPARSE", "on")
        spy = _Spy(monkeypatch)
        sparse = student(ids).logits
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-5)
    assert {c[1] for c in spy.taken()} == _binary_layers(student)  # every binary Linear, head included


def _fused_steps(monkeypatch) -> list[int]:
    """Records the rows of each fused decode step (students/ops/decode_step)."""
    rows, real = [], FusedDecoder.step
    monkeypatch.setattr(FusedDecoder, "step", lambda self, ids, *a: rows.append(ids.shape[0]) or real(self, ids, *a))
    return rows


def test_generate_takes_the_event_path_in_auto_mode(student, monkeypatch):
    """Decode steps (one row) take the fused event-driven step under the default mode, where this CPU's
    calibration says the event path wins at one row (injected here)."""
    monkeypatch.delenv("SPIKEDISTILL_SPARSE", raising=False)
    monkeypatch.setattr(calibrate, "_tables", {torch.get_num_threads(): {"small": ((1, 0.5),), "large": ()}})
    ids = torch.randint(0, student.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(1))
    monkeypatch.setenv("SPIKEDISTILL_SPARSE", "off")
    dense = student.generate(ids, max_new_tokens=12)
    monkeypatch.delenv("SPIKEDISTILL_SPARSE")
    steps = _fused_steps(monkeypatch)
    sparse = student.generate(ids, max_new_tokens=12)
    assert torch.equal(sparse, dense)
    new_tokens = sparse.shape[1] - ids.shape[1]  # generation may stop at EOS
    assert new_tokens >= 3 and steps == [1] * (new_tokens - 1)  # every decode step after the prefill


def test_generate_command_takes_it(student_dir, monkeypatch, capsys):
    monkeypatch.setenv("SPIKEDISTILL_SPARSE", "on")
    steps = _fused_steps(monkeypatch)
    assert eval_main(["generate", str(student_dir), "--prompt", "It is a truth", "--max-new-tokens", "6"]) == 0
    sparse_text = capsys.readouterr().out
    assert len(steps) >= 5
    monkeypatch.setenv("SPIKEDISTILL_SPARSE", "off")
    assert eval_main(["generate", str(student_dir), "--prompt", "It is a truth", "--max-new-tokens", "6"]) == 0
    assert capsys.readouterr().out == sparse_text


def test_streaming_bits_per_byte_takes_it(student, tiny_tokenizer, monkeypatch):
    text = "It is a truth universally acknowledged, that a single man in possession of a good fortune."
    monkeypatch.setenv("SPIKEDISTILL_SPARSE", "off")
    dense = evaluate_bpb(student, tiny_tokenizer, text, context_length=8)["bits_per_byte"]
    monkeypatch.setenv("SPIKEDISTILL_SPARSE", "on")
    spy = _Spy(monkeypatch)
    sparse = evaluate_bpb(student, tiny_tokenizer, text, context_length=8)["bits_per_byte"]
    assert sparse == pytest.approx(dense, rel=1e-6)
    assert {c[1] for c in spy.taken()} == _binary_layers(student)


def test_lm_eval_adapter_takes_it(student, tiny_tokenizer, monkeypatch):
    lm = SpikeGPTLM(student, tokenizer=tiny_tokenizer, batch_size=2, max_length=32)
    reqs = [Instance("loglikelihood", {}, ("It is a truth", " universally acknowledged"), 0),
            Instance("loglikelihood", {}, ("a single man", " in possession"), 1)]
    gen = [Instance("generate_until", {}, ("It is a truth", {"until": ["<never>"], "max_gen_toks": 5}), 0)]
    monkeypatch.setenv("SPIKEDISTILL_SPARSE", "off")
    dense = lm.loglikelihood(reqs, disable_tqdm=True), lm.generate_until(gen, disable_tqdm=True)
    monkeypatch.setenv("SPIKEDISTILL_SPARSE", "on")
    spy, steps = _Spy(monkeypatch), _fused_steps(monkeypatch)
    sparse = lm.loglikelihood(reqs, disable_tqdm=True)
    assert {c[1] for c in spy.taken()} == _binary_layers(student) and steps == []
    assert lm.generate_until(gen, disable_tqdm=True) == dense[1]
    assert len(steps) >= 1  # its decode steps: the fused step
    for (lp, greedy), (lp_d, greedy_d) in zip(sparse, dense[0]):
        assert lp == pytest.approx(lp_d, rel=1e-5) and greedy == greedy_d
