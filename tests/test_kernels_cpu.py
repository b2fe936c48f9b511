"""Fast CPU kernels (students/ops/*/cpu.py) against the references: outputs and gradients, awkward shapes."""
import pytest
import torch

from students.ops import lif_scan, sfsa, sfsa_linear, wkv
from students.ops._dispatch import select_backend
from students.ops.csrc import library
from students.ops.lif import lif_scan_reference
from students.ops.lif.cpu import lif_scan_cpu
from students.ops.sfsa import sfsa_linear_reference, sfsa_reference
from students.ops.sfsa.cpu import sfsa_cpu, sfsa_linear_chunked
from students.ops.wkv import wkv_reference
from students.ops.wkv.cpu import wkv_cpu

pytestmark = pytest.mark.skipif(library() is None, reason="the CPU kernel library could not be built (no g++?)")


def _grads(outputs, inputs, seed=1):
    """Gradients of a random linear functional of `outputs` w.r.t. `inputs` (same cotangents every call)."""
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen)).sum() for o in outputs)
    return torch.autograd.grad(loss, inputs)


def _close(a, b, rtol=1e-5, atol=1e-5):
    for x, y in zip(a, b):
        torch.testing.assert_close(x.float(), y.float(), rtol=rtol, atol=atol)


LIF_CASES = [
    # (shape [B, S, *N], options)
    ((2, 1, 5), {}),  # one time step
    ((1, 37, 70), {"reset": "soft", "surrogate": "sigmoid", "alpha": 4.0}),  # lanes not a multiple of the block
    ((3, 17, 4, 5), {"tau": 3.0, "v_threshold": 0.5, "detach_reset": True}),  # several neuron axes
    ((2, 9, 19), {"reset": "soft", "decay_input": False, "detach_reset": True}),
    ((1, 2048, 3), {}),  # long sequence, batch 1
]


@pytest.mark.parametrize("shape,opts", LIF_CASES)
@pytest.mark.parametrize("with_v0", [False, True])
def test_lif_cpu_matches_reference(shape, opts, with_v0):
    torch.manual_seed(0)
    x = (torch.randn(shape) * 1.5 + 0.7).requires_grad_()
    v0 = torch.randn(shape[:1] + shape[2:]).requires_grad_() if with_v0 else None
    ref, fast = lif_scan_reference(x, v0, **opts), lif_scan_cpu(x, v0, **opts)
    assert torch.equal(ref[0], fast[0]) and torch.equal(ref[1], fast[1])  # spikingjelly's charge in both
    inputs = (x, v0) if with_v0 else (x,)
    _close(_grads(ref, inputs), _grads(fast, inputs), rtol=1e-4, atol=1e-5)


def test_lif_cpu_streaming_equals_one_pass():
    torch.manual_seed(0)
    x = torch.randn(2, 30, 33) + 0.8
    spikes, v = lif_scan_cpu(x)
    s1, v1 = lif_scan_cpu(x[:, :11])
    s2, v2 = lif_scan_cpu(x[:, 11:], v1)
    assert torch.equal(torch.cat([s1, s2], 1), spikes)
    torch.testing.assert_close(v2, v)


def test_lif_cpu_bf16_is_fp32_math():
    torch.manual_seed(0)
    x = (torch.randn(2, 40, 24) + 0.8).bfloat16()
    spikes, v = lif_scan_cpu(x)
    ref_spikes, ref_v = lif_scan_reference(x.float())
    assert spikes.dtype == torch.bfloat16 and torch.equal(spikes.float(), ref_spikes)
    assert v.dtype == torch.float32 and torch.equal(v, ref_v)  # the carried membrane is never rounded
    bf16_spikes, bf16_v = lif_scan_reference(x)  # the reference charges in fp32 too
    assert bf16_spikes.dtype == torch.bfloat16 and torch.equal(bf16_spikes, spikes) and torch.equal(bf16_v, v)


@pytest.mark.parametrize("scan", [lif_scan_cpu, lif_scan_reference])
def test_lif_bf16_token_by_token_equals_one_pass(scan):
    # issue 14 (c): a membrane handed back in bf16 rounded the state at every call; 69 of 256,000 spikes
    # differed between one pass and token by token
    torch.manual_seed(1)
    x = (torch.randn(2, 64, 128) * 1.5 + 0.6).bfloat16()
    spikes, v = scan(x)
    v_t, steps = None, []
    for t in range(x.shape[1]):
        s_t, v_t = scan(x[:, t : t + 1], v_t)
        steps.append(s_t)
    assert v_t.dtype == torch.float32
    assert torch.equal(torch.cat(steps, 1), spikes) and torch.equal(v_t, v)


def test_lif_bf16_membrane_rounding_would_change_spikes():
    # the input above is one where it matters: rounding the carried membrane to bf16 between calls (the bug)
    # changes spikes, so the equality test cannot pass by luck
    torch.manual_seed(1)
    x = (torch.randn(2, 64, 128) * 1.5 + 0.6).bfloat16()
    spikes, _ = lif_scan_cpu(x)
    v_t, steps = None, []
    for t in range(x.shape[1]):
        s_t, v_t = lif_scan_cpu(x[:, t : t + 1], v_t)
        v_t = v_t.bfloat16()
        steps.append(s_t)
    assert not torch.equal(torch.cat(steps, 1), spikes)


@pytest.mark.parametrize("kernels", ["auto", "reference"])
def test_bf16_student_bits_per_byte_do_not_depend_on_chunk_size(monkeypatch, kernels):
    # issue 14 (c): 2.5445 / 2.5438 / 2.5424 bits/byte for chunks of 512 / 7 / 1 tokens before the fix
    from eval.scoring import stream_logprobs
    from students import SpikeGPTConfig, SpikeGPTForCausalLM

    monkeypatch.setenv("SPIKEDISTILL_KERNELS", kernels)
    torch.manual_seed(0)
    model = SpikeGPTForCausalLM(SpikeGPTConfig.from_preset("tiny", vocab_size=97)).eval().to(torch.bfloat16)
    tokens = torch.randint(0, 97, (120,)).tolist()
    with torch.no_grad():
        whole, _ = stream_logprobs(model, tokens, chunk_size=512)
        for chunk in (7, 1):
            assert torch.equal(stream_logprobs(model, tokens, chunk_size=chunk)[0], whole), chunk


def _wkv_inputs(B, L, C, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    td = torch.randn(C, generator=gen).requires_grad_()
    tf = torch.randn(C, generator=gen).requires_grad_()
    k = (torch.randn(B, L, C, generator=gen) * 2).to(dtype).requires_grad_()
    v = torch.randn(B, L, C, generator=gen).to(dtype).requires_grad_()
    return td, tf, k, v


def _wkv_float64(time_decay, time_first, k, v):
    """WKV from its definition in float64, with no running max: y_t is the average of v_0..v_t weighted by
    softmax_i of -(t-1-i) e^w + k_i (i < t) and u + k_t (i = t). Inputs [C], [C], [B, L, C] -> y [B, L, C]."""
    L = k.shape[1]
    t = torch.arange(L, dtype=torch.float64)
    lag = (t[:, None] - 1 - t[None, :])  # [t, i]
    logits = -lag[None, :, :, None] * time_decay.exp()[None, None, None, :] + k[:, None, :, :]  # [B, t, i, C]
    eye = torch.eye(L, dtype=torch.bool)[None, :, :, None]
    logits = torch.where(eye, time_first + k[:, None, :, :], logits)
    logits = logits.masked_fill((lag < -1)[None, :, :, None], float("-inf"))  # i > t: not seen yet
    return (torch.softmax(logits, dim=2) * v[:, None, :, :]).sum(2)


def _wkv_grads(fn, td, tf, k, v, g_y):
    inputs = [x.detach().clone().requires_grad_() for x in (td, tf, k, v)]
    y = fn(*inputs)
    y = y[0] if isinstance(y, tuple) else y
    return torch.autograd.grad((y.double() * g_y).sum(), inputs)


@pytest.mark.parametrize("case", ["time_first=12", "time_first=20", "time_decay=90", "time_decay=200"])
@pytest.mark.parametrize("impl", ["cpu", "reference"])
def test_wkv_gradients_match_float64_at_extreme_parameters(case, impl):
    # issue 14 (d): time_first's gradient cancelled in the C kernel (98% error at 20); time_decay > ~88.7 gave
    # NaN gradients in both (exp overflow, 0 * inf). Half the channels take the extreme value.
    gen = torch.Generator().manual_seed(7)
    B, L, C = 2, 12, 6
    td, tf = torch.randn(C, generator=gen) * 0.5, torch.randn(C, generator=gen) * 0.5
    name, value = case.split("=")
    (tf if name == "time_first" else td)[::2] = float(value)
    k, v = torch.randn(B, L, C, generator=gen) * 2, torch.randn(B, L, C, generator=gen)
    g_y = torch.randn(B, L, C, generator=gen, dtype=torch.float64)
    want = _wkv_grads(_wkv_float64, td.double(), tf.double(), k.double(), v.double(), g_y)
    fn = wkv_cpu if impl == "cpu" else wkv_reference
    got = _wkv_grads(fn, td, tf, k, v, g_y)
    for name_, a, b in zip(("time_decay", "time_first", "k", "v"), got, want):
        assert torch.isfinite(a).all(), name_
        # relative to each group of channels' own scale: the extreme channels' gradients are far smaller
        for group in (slice(0, None, 2), slice(1, None, 2)):
            a_g, b_g = a[..., group].double(), b[..., group]
            scale = b_g.abs().max()
            err = float((a_g - b_g).abs().max() / scale) if scale > 0 else float(a_g.abs().max())
            assert err < 1e-4, (name_, group, err)


@pytest.mark.parametrize("B,L,C", [(2, 1, 5), (1, 37, 20), (3, 13, 70)])
@pytest.mark.parametrize("with_state", [False, True])
def test_wkv_cpu_matches_reference(B, L, C, with_state):
    td, tf, k, v = _wkv_inputs(B, L, C)
    inputs = [td, tf, k, v]
    state = None
    if with_state:
        with torch.no_grad():
            _, warm = wkv_reference(td, tf, torch.randn(B, 6, C), torch.randn(B, 6, C))
        state = tuple(s.clone().requires_grad_() for s in warm)
        inputs += list(state)
    y_ref, s_ref = wkv_reference(td, tf, k, v, state)
    y_fast, s_fast = wkv_cpu(td, tf, k, v, state)
    _close((y_ref, *s_ref), (y_fast, *s_fast))
    # gradients through y and the returned state (streaming training)
    _close(_grads((y_ref, *s_ref), inputs), _grads((y_fast, *s_fast), inputs), rtol=1e-4, atol=1e-5)


def test_wkv_cpu_long_sequence_is_stable():
    td, tf, k, v = _wkv_inputs(1, 2048, 6)
    with torch.no_grad():
        k.mul_(20)  # large keys: overflow without the running max
    y_ref, _ = wkv_reference(td, tf, k, v)
    y_fast, _ = wkv_cpu(td, tf, k, v)
    assert torch.isfinite(y_fast).all()
    torch.testing.assert_close(y_fast, y_ref, rtol=1e-4, atol=1e-5)
    g_ref, g_fast = _grads((y_ref,), (td, tf, k, v)), _grads((y_fast,), (td, tf, k, v))
    assert all(torch.isfinite(g).all() for g in g_fast)
    _close(g_ref, g_fast, rtol=1e-3, atol=1e-4)


def test_wkv_cpu_streaming_and_bf16():
    td, tf, k, v = _wkv_inputs(2, 24, 9, dtype=torch.bfloat16)
    with torch.no_grad():
        y, state = wkv_cpu(td, tf, k, v)
        y1, st1 = wkv_cpu(td, tf, k[:, :10], v[:, :10])
        y2, st2 = wkv_cpu(td, tf, k[:, 10:], v[:, 10:], st1)
        y_ref, _ = wkv_reference(td, tf, k, v)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(torch.cat([y1, y2], 1), y)
    for a, b in zip(st2, state):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=1e-2, atol=1e-2)


def _spikes(*shape, p=0.4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=gen) < p).float().requires_grad_()


@pytest.mark.parametrize("shape", [(1, 1, 1, 4), (2, 3, 37, 8), (1, 2, 70, 16), (1, 2, 150, 4)])
@pytest.mark.parametrize("threshold", [2.0, "per_head"])
@pytest.mark.parametrize("surrogate", ["atan", "sigmoid"])
def test_sfsa_cpu_matches_reference(shape, threshold, surrogate):
    q, k, v = (_spikes(*shape, seed=s) for s in range(3))
    inputs = [q, k, v]
    if threshold == "per_head":
        threshold = torch.linspace(1.0, 3.0, shape[1]).requires_grad_()
        inputs.append(threshold)
    ref = sfsa_reference(q, k, v, threshold, surrogate=surrogate)
    fast = sfsa_cpu(q, k, v, threshold, surrogate=surrogate)
    assert torch.equal(ref[0], fast[0]) and torch.equal(ref[1], fast[1])
    # gradients through both the output and the attention map (attention-map alignment uses it)
    _close(_grads(ref, inputs), _grads(fast, inputs), rtol=1e-4, atol=1e-5)


def test_sfsa_cpu_bf16():
    q, k, v = (_spikes(2, 2, 19, 8, seed=s).detach().bfloat16() for s in range(3))
    out, attn = sfsa_cpu(q, k, v, 2.0)
    ref_out, ref_attn = sfsa_reference(q, k, v, 2.0)
    assert out.dtype == torch.bfloat16 and torch.equal(out, ref_out) and torch.equal(attn, ref_attn)


@pytest.mark.parametrize("L,chunk", [(1, 64), (37, 16), (64, 16), (100, 64)])
@pytest.mark.parametrize("with_state", [False, True])
def test_sfsa_linear_chunked_matches_reference(L, chunk, with_state):
    q, k, v = (_spikes(2, 2, L, 8, seed=s) for s in range(3))
    state = torch.randn(2, 2, 8, 8).requires_grad_() if with_state else None
    inputs = [q, k, v] + ([state] if with_state else [])
    ref = sfsa_linear_reference(q, k, v, state)
    fast = sfsa_linear_chunked(q, k, v, state, chunk=chunk)
    _close(ref, fast, rtol=1e-5, atol=1e-4)
    _close(_grads(ref, inputs), _grads(fast, inputs), rtol=1e-5, atol=1e-4)


def test_dispatch_honours_environment(monkeypatch):
    x = torch.randn(1, 3, 4)
    monkeypatch.setenv("SPIKEDISTILL_KERNELS", "reference")
    assert select_backend(x) == "reference"
    monkeypatch.setenv("SPIKEDISTILL_KERNELS", "auto")
    assert select_backend(x) == "cpu"
    assert select_backend(x.double()) == "reference"  # fp64 (gradcheck) always runs the exact reference
    monkeypatch.setenv("SPIKEDISTILL_KERNELS", "bogus")
    with pytest.raises(ValueError, match="SPIKEDISTILL_KERNELS"):
        select_backend(x)


def test_dispatch_functions_agree_across_backends(monkeypatch):
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6) + 0.8
    q, k, v = (_spikes(1, 2, 9, 4, seed=s).detach() for s in range(3))
    td, tf, kk, vv = (t.detach() for t in _wkv_inputs(1, 7, 5))
    results = {}
    for backend in ("reference", "cpu"):
        monkeypatch.setenv("SPIKEDISTILL_KERNELS", backend)
        results[backend] = (lif_scan(x)[0], wkv(td, tf, kk, vv)[0], sfsa(q, k, v, 1.0)[0], sfsa_linear(q, k, v)[0])
    _close(results["reference"], results["cpu"])


def test_missing_library_falls_back_to_reference(monkeypatch):
    from students.ops import csrc

    monkeypatch.setattr(csrc, "library", lambda: None)
    monkeypatch.setenv("SPIKEDISTILL_KERNELS", "cpu")
    assert select_backend(torch.randn(2, 2)) == "reference"


def test_loading_the_library_leaves_float_environment_alone():
    # a -ffast-math link would add crtfastmath.o: flush-to-zero for the whole process, changing torch's numerics
    library()
    tiny = torch.tensor([1e-39])  # a float32 denormal
    assert (tiny * 1.0).item() != 0.0
