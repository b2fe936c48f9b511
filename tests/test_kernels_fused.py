"""Fused training ops (students/ops/linear_ce, students/ops/fused_lif): CPU fast paths against the references,
and a whole student's loss and gradients with SPIKEDISTILL_KERNELS=reference against the fast paths."""
import pytest
import torch

from students import SpikeGPTConfig, SpikeGPTForCausalLM
from students.ops import linear_cross_entropy
from students.ops.csrc import library
from students.ops.fused_lif import (
    relu_square_lif_reference,
    sigmoid_gate_lif_reference,
    token_shift_lif_reference,
)
from students.ops.fused_lif.cpu import relu_square_lif_cpu, sigmoid_gate_lif_cpu, token_shift_lif_cpu
from students.ops.linear_ce import cpu as linear_ce_cpu
from students.ops.linear_ce import linear_cross_entropy_reference
from students.ops.linear_ce.cpu import linear_cross_entropy_cpu

pytestmark = pytest.mark.skipif(library() is None, reason="the CPU kernel library did not build (g++)")

LIF = {"tau": 2.0, "v_threshold": 1.0, "reset": "hard", "decay_input": True, "detach_reset": False,
       "surrogate": "atan", "alpha": 2.0}  # fmt: skip
LIF_VARIANTS = [
    LIF,
    {**LIF, "reset": "soft", "surrogate": "sigmoid", "detach_reset": True, "alpha": 4.0},
    {**LIF, "tau": 3.0, "v_threshold": 0.5, "decay_input": False},
    None,  # no neuron: the producer alone
]


def _grads(outputs, inputs, seed=1):
    """Gradients of a random projection of every output (so each output's gradient path is exercised)."""
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen)).sum() for o in outputs if o is not None)
    return torch.autograd.grad(loss, inputs)


def _close(a, b, rtol=1e-5, atol=1e-5):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        if x is None or y is None:
            assert x is None and y is None
            continue
        torch.testing.assert_close(x.float(), y.float(), rtol=rtol, atol=atol)


# ---- linear_cross_entropy ------------------------------------------------------------------------------------


def _head_inputs(n, c, v, binary, seed=0, ignore=(3,)):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.rand(n, c, generator=gen) < 0.2).float() if binary else torch.randn(n, c, generator=gen)
    w = torch.randn(v, c, generator=gen) * c**-0.5
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[[i for i in ignore if i < n]] = -100
    return x.requires_grad_(), w.requires_grad_(), labels


@pytest.mark.parametrize("binary", [False, True])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize(
    "n,c,v,chunk",
    [(1, 1, 1, 4), (37, 24, 101, 8), (64, 7, 64, 64), (70, 33, 257, 16)],  # V off the 32-column tile, N % chunk != 0
)
def test_linear_ce_cpu_matches_reference(binary, reduction, n, c, v, chunk):
    x, w, labels = _head_inputs(n, c, v, binary)
    if binary:
        assert linear_ce_cpu.uses_sparse(x) or x.mean() > linear_ce_cpu.SPARSE_MAX_RATE
    ref = linear_cross_entropy_reference(x, w, labels, reduction)
    fast = linear_cross_entropy_cpu(x, w, labels, reduction, chunk_size=chunk)
    if n == 1:  # the only row is labelled (index 3 does not exist)
        assert torch.isfinite(ref)
    _close([ref], [fast])
    # a non-unit incoming gradient: the gradients computed in the forward are scaled in the backward
    _close(torch.autograd.grad(ref * 1.7, (x, w)), torch.autograd.grad(fast * 1.7, (x, w)))


def test_linear_ce_spike_aware_and_dense_paths_agree(monkeypatch):
    # Binary input at rate ~0.2: the spike-aware matmuls run; SPIKEDISTILL_SPARSE=off forces the dense ones.
    x, w, labels = _head_inputs(96, 40, 150, binary=True, seed=3)
    assert linear_ce_cpu.uses_sparse(x)
    sparse = linear_cross_entropy_cpu(x, w, labels, chunk_size=32)
    g_sparse = torch.autograd.grad(sparse, (x, w))
    monkeypatch.setenv("SPIKEDISTILL_SPARSE", "off")
    assert not linear_ce_cpu.uses_sparse(x)
    dense = linear_cross_entropy_cpu(x, w, labels, chunk_size=32)
    _close([sparse], [dense])
    _close(g_sparse, torch.autograd.grad(dense, (x, w)))


def test_linear_ce_sparse_path_choice(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    low = (torch.rand(64, 32, generator=gen) < 0.1).float()
    assert linear_ce_cpu.uses_sparse(low)
    assert not linear_ce_cpu.uses_sparse(low * 0.5 + 0.25)  # not binary
    assert not linear_ce_cpu.uses_sparse((torch.rand(64, 32, generator=gen) < 0.9).float())  # too dense
    rate = torch.zeros(64, 32)
    rate[:, :3] = 1.0
    rate[0, 5] = 0.5  # one non-binary entry is enough to use the dense matmuls
    assert not linear_ce_cpu.uses_sparse(rate)
    monkeypatch.setenv("SPIKEDISTILL_SPARSE", "on")  # any binary input, whatever its rate
    assert linear_ce_cpu.uses_sparse((torch.rand(64, 32, generator=gen) < 0.9).float())
    assert not linear_ce_cpu.uses_sparse(rate)
    monkeypatch.setenv("SPIKEDISTILL_SPARSE", "sometimes")
    with pytest.raises(ValueError, match="SPIKEDISTILL_SPARSE"):
        linear_ce_cpu.uses_sparse(low)


def test_linear_ce_spike_kernels_are_exercised(monkeypatch):
    # Mutant guard: a spike-aware logits kernel that drops the last active input must break parity.
    x, w, labels = _head_inputs(20, 16, 70, binary=True, seed=5)
    ref = linear_cross_entropy_reference(x, w, labels)
    real_csr = linear_ce_cpu._csr

    def drop_last(m):
        ptr, idx = real_csr(m)
        ptr[1:] = torch.clamp(ptr[1:] - 1, min=0).maximum(ptr[:-1])
        return ptr, idx

    monkeypatch.setattr(linear_ce_cpu, "_csr", drop_last)
    assert not torch.allclose(ref, linear_cross_entropy_cpu(x, w, labels), atol=1e-4)


def test_linear_ce_without_grad_and_frozen_weight():
    x, w, labels = _head_inputs(30, 12, 50, binary=False)
    with torch.no_grad():
        loss = linear_cross_entropy_cpu(x, w, labels)
    assert loss.grad_fn is None
    _close([loss], [linear_cross_entropy_reference(x, w, labels)])
    frozen = w.detach()
    (g_x,) = torch.autograd.grad(linear_cross_entropy_cpu(x, frozen, labels), (x,))
    _close([g_x], torch.autograd.grad(linear_cross_entropy_reference(x, frozen, labels), (x,)))


def test_linear_ce_all_rows_ignored_matches_reference():
    x, w, _ = _head_inputs(6, 5, 9, binary=True)
    labels = torch.full((6,), -100)
    ref, fast = linear_cross_entropy_reference(x, w, labels), linear_cross_entropy_cpu(x, w, labels)
    assert torch.isnan(ref) and torch.isnan(fast)
    _close(torch.autograd.grad(ref, (x, w)), torch.autograd.grad(fast, (x, w)))  # zeros
    assert float(linear_cross_entropy_cpu(x, w, labels, "sum").detach()) == 0.0


def test_linear_ce_bf16_is_fp32_math():
    x, w, labels = _head_inputs(40, 16, 80, binary=True)
    xb, wb = x.detach().bfloat16().requires_grad_(), w.detach().bfloat16().requires_grad_()
    fast = linear_cross_entropy_cpu(xb, wb, labels)
    ref = linear_cross_entropy_reference(xb.float(), wb.float(), labels)
    assert fast.dtype == torch.float32
    _close([fast], [ref])
    g = torch.autograd.grad(fast, (xb, wb))
    assert g[0].dtype == torch.bfloat16 and g[1].dtype == torch.bfloat16
    _close(g, torch.autograd.grad(ref, (xb, wb)), rtol=1e-2, atol=1e-3)


def test_linear_ce_rejects_bad_arguments():
    x, w, labels = _head_inputs(4, 3, 5, binary=False)
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(x, w, labels, reduction="none")
    with pytest.raises(ValueError, match=r"weight \[V, C\]"):
        linear_cross_entropy(x, w[:, :2], labels)
    with pytest.raises(ValueError, match="labels"):
        linear_cross_entropy(x, w, labels[:3])


# ---- fused_lif -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("lif", LIF_VARIANTS)
@pytest.mark.parametrize("shape,with_v0", [((1, 1, 1), False), ((2, 9, 70), True), ((3, 5, 130), False)])
def test_sigmoid_gate_and_relu_square_lif_match_reference(lif, shape, with_v0):
    gen = torch.Generator().manual_seed(0)
    r = (torch.randn(shape, generator=gen) * 2).requires_grad_()
    y = (torch.randn(shape, generator=gen) * 2 + 1).requires_grad_()
    v0 = torch.randn(shape[0], shape[2], generator=gen).requires_grad_() if with_v0 and lif else None
    inputs = (r, y) if v0 is None else (r, y, v0)
    ref, fast = sigmoid_gate_lif_reference(r, y, v0, lif), sigmoid_gate_lif_cpu(r, y, v0, lif)
    assert torch.equal(ref[0], fast[0]) if lif else True
    _close(ref, fast)
    _close(_grads(ref, inputs), _grads(fast, inputs))
    inputs = (r,) if v0 is None else (r, v0)
    ref, fast = relu_square_lif_reference(r, v0, lif), relu_square_lif_cpu(r, v0, lif)
    assert torch.equal(ref[0], fast[0]) if lif else True
    _close(ref, fast)
    _close(_grads(ref, inputs), _grads(fast, inputs))


@pytest.mark.parametrize("lif", LIF_VARIANTS)
@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("c,branches,length,with_state", [(1, 1, 1, True), (70, 3, 4, True), (130, 2, 5, False)])
def test_token_shift_lif_matches_reference(lif, steps, c, branches, length, with_state):
    gen = torch.Generator().manual_seed(1)
    b = 2
    h = (torch.randn(b, length * steps, c, generator=gen) * 2).requires_grad_()
    mix = torch.rand(branches, c, generator=gen).requires_grad_()
    prev = torch.randn(b * steps, c, generator=gen).requires_grad_() if with_state else None
    v0 = torch.randn(b, branches * c, generator=gen).requires_grad_() if with_state and lif else None
    inputs = [t for t in (h, mix, prev, v0) if t is not None]
    ref = token_shift_lif_reference(h, mix, prev, v0, steps, lif)
    fast = token_shift_lif_cpu(h, mix, prev, v0, steps, lif)
    if lif:
        assert torch.equal(ref[0], fast[0])
    _close(ref, fast)
    _close(_grads(ref, inputs), _grads(fast, inputs))  # includes the returned last token (the next prev)


def test_token_shift_lif_streams():
    # Two calls carrying (last token, membrane) equal one call over the whole sequence.
    gen = torch.Generator().manual_seed(2)
    h, mix = torch.randn(2, 12, 40, generator=gen) * 2, torch.rand(3, 40, generator=gen)
    whole, v_whole, last_whole = token_shift_lif_cpu(h, mix, None, None, 2, LIF)
    first, v_a, last_a = token_shift_lif_cpu(h[:, :6], mix, None, None, 2, LIF)
    second, v_b, last_b = token_shift_lif_cpu(h[:, 6:], mix, last_a, v_a, 2, LIF)
    assert torch.equal(torch.cat([first, second], 1), whole)
    torch.testing.assert_close(v_b, v_whole)
    assert torch.equal(last_b, last_whole)


def test_fused_lif_bf16_is_fp32_math():
    gen = torch.Generator().manual_seed(3)
    r, y = torch.randn(2, 6, 20, generator=gen).bfloat16(), (torch.randn(2, 6, 20, generator=gen) + 1).bfloat16()
    out, v_last = sigmoid_gate_lif_cpu(r, y, None, LIF)
    ref, v_ref = sigmoid_gate_lif_reference(r.float(), y.float(), None, LIF)
    assert out.dtype == torch.bfloat16 and torch.equal(out.float(), ref)
    assert v_last.dtype == torch.float32  # the carried membrane is not rounded to bf16
    torch.testing.assert_close(v_last, v_ref)


# ---- a whole student -----------------------------------------------------------------------------------------


def _student_loss_and_grads(model, ids):
    model.zero_grad(set_to_none=True)
    h = model(ids, skip_logits=True).head_input
    targets = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100).reshape(-1)
    loss = linear_cross_entropy(h.reshape(-1, h.shape[-1]), model.lm_head.weight, targets)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "overrides",
    [
        {"token_mixer": "srwkv", "spike_driven": True},
        {"token_mixer": ["srwkv", "sfsa"], "spike_driven": True, "time_steps": 2},
        {"token_mixer": "srwkv", "spike_driven": False, "binary_embedding": False},
    ],
)
def test_student_loss_and_gradients_match_reference_kernels(monkeypatch, overrides):
    torch.manual_seed(0)
    cfg = SpikeGPTConfig(vocab_size=97, n_layer=2, d_model=32, n_head=2, **overrides)
    model = SpikeGPTForCausalLM(cfg)
    ids = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(0))
    fast_loss, fast_grads = _student_loss_and_grads(model, ids)
    hf_loss = model(ids, labels=ids, skip_logits=False).loss  # the model's plain loss: logits + F.cross_entropy
    monkeypatch.setenv("SPIKEDISTILL_KERNELS", "reference")
    ref_loss, ref_grads = _student_loss_and_grads(model, ids)
    torch.testing.assert_close(fast_loss, ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(hf_loss.detach(), ref_loss, rtol=1e-5, atol=1e-6)
    assert fast_grads.keys() == ref_grads.keys() and len(ref_grads) > 10
    for name, g in ref_grads.items():
        torch.testing.assert_close(fast_grads[name], g, rtol=1e-4, atol=1e-6, msg=name)
