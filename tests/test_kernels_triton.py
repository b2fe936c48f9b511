"""Triton kernels against the references on CPU, through the Triton interpreter (TRITON_INTERPRET=1).

Triton decides between compiled and interpreted kernels when it is imported, and other packages import it
early (transformers does). So unless this process started with TRITON_INTERPRET=1, the module defines one
test that re-runs this file in a subprocess with the variable set; there the parity tests run. Shapes are
tiny because interpreted kernels run 20-400x slower than eager PyTorch.
"""
import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from test_lif_numerics import ISSUE_CURRENTS, VARIANTS, near_threshold_currents, spikingjelly_lif

if importlib.util.find_spec("triton") is None:
    pytest.skip("triton is not installed (pip install triton): Triton kernels untested", allow_module_level=True)

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"

# In the parent process the parity tests below are collected but skipped: the subprocess runs them.
interpreted_only = pytest.mark.skipif(not INTERPRETED, reason="runs in the TRITON_INTERPRET=1 subprocess")


@pytest.mark.skipif(INTERPRETED, reason="this is the subprocess")
def test_triton_kernels_under_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__],
        check=False, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    summary = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else ""
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert " passed" in summary and "failed" not in summary, run.stdout[-2000:]


if INTERPRETED:
    from students.ops import lif_scan
    from students.ops._dispatch import select_backend
    from students.ops.fused_lif import (
        sigmoid_gate_lif,
        sigmoid_gate_lif_reference,
        token_shift_lif,
        token_shift_lif_reference,
    )
    from students.ops.lif import lif_scan_reference
    from students.ops.lif.triton import lif_scan_triton
    from students.ops.linear_ce import linear_cross_entropy_reference
    from students.ops.linear_ce.triton import linear_cross_entropy_triton
    from students.ops.sfsa import sfsa_reference
    from students.ops.sfsa.triton import sfsa_triton
    from students.ops.wkv import wkv_reference
    from students.ops.wkv.triton import wkv_triton


def _grads(outputs, inputs, seed=1):
    gen = torch.Generator().manual_seed(seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen)).sum() for o in outputs)
    return torch.autograd.grad(loss, inputs)


def _close(a, b, rtol=1e-4, atol=1e-5):
    for x, y in zip(a, b):
        torch.testing.assert_close(x.float(), y.float(), rtol=rtol, atol=atol)


@interpreted_only
@pytest.mark.parametrize(
    "shape,opts",
    [
        ((1, 1, 3), {}),
        ((2, 7, 130), {"reset": "soft", "surrogate": "sigmoid", "detach_reset": True}),  # N crosses a block
        ((1, 5, 2, 3), {"tau": 3.0, "v_threshold": 0.5, "decay_input": False}),
    ],
)
def test_lif_triton_matches_reference(shape, opts):
    torch.manual_seed(0)
    x = (torch.randn(shape) * 1.5 + 0.7).requires_grad_()
    v0 = torch.randn(shape[:1] + shape[2:]).requires_grad_()
    ref, fast = lif_scan_reference(x, v0, **opts), lif_scan_triton(x, v0, **opts)
    assert torch.equal(ref[0], fast[0]) and torch.equal(ref[1], fast[1])  # spikingjelly's charge in both
    _close(_grads(ref, (x, v0)), _grads(fast, (x, v0)))


def _stepwise_triton(x, lif):
    v, out = None, []
    for t in range(x.shape[1]):
        s, v = lif_scan_triton(x[:, t : t + 1], v, **lif)
        out.append(s)
    return torch.cat(out, 1), v


@interpreted_only
def test_lif_triton_issue_currents_do_not_fire():
    # issue 23 item 11: spikingjelly gives [0, 0]; beta*V + X/tau fired at the second step
    x = torch.tensor(ISSUE_CURRENTS, dtype=torch.float32).view(1, 2, 1)
    expected_v = spikingjelly_lif(np.array(ISSUE_CURRENTS, dtype=np.float32)[:, None])[1]
    for spikes, v in (lif_scan_triton(x), _stepwise_triton(x, {})):
        assert spikes.flatten().tolist() == [0.0, 0.0] and v.flatten().tolist() == expected_v.tolist()


@interpreted_only
@pytest.mark.parametrize("lif", VARIANTS)
def test_lif_triton_fires_exactly_as_spikingjelly(lif):
    opts = {"tau": 2.0, "v_threshold": 1.0, "reset": "hard", "decay_input": True, **lif}
    currents = near_threshold_currents(300, opts["tau"], opts["v_threshold"], opts["decay_input"])
    expected_spikes, expected_v = spikingjelly_lif(currents, **opts)
    assert 0.2 < expected_spikes[1].mean() < 0.8
    x = torch.from_numpy(currents)[None]
    for spikes, v in (lif_scan_triton(x, **opts), _stepwise_triton(x, opts)):
        assert np.array_equal(spikes[0].numpy(), expected_spikes) and np.array_equal(v[0].numpy(), expected_v)


@interpreted_only
@pytest.mark.parametrize("tau,decay_input", [(2.0, True), (3.0, True), (3.0, False)])
def test_lif_triton_charge_gradient(tau, decay_input):
    # one step below threshold, detach_reset: d v_last / d x = 1/tau and d v_last / d v0 = 1 - 1/tau, formed as
    # autograd forms them from V + (X - V) / tau (or V * float32(1 - 1/tau) + X)
    x, v0 = torch.tensor([[[0.3]]], requires_grad=True), torch.tensor([[0.2]], requires_grad=True)
    _, v = lif_scan_triton(x, v0, tau=tau, decay_input=decay_input, detach_reset=True)
    f = np.float32
    expected = (f(1) / f(tau), f(1) - f(1) / f(tau)) if decay_input else (f(1), f(1.0 - 1.0 / tau))
    assert tuple(g.item() for g in torch.autograd.grad(v.sum(), (x, v0))) == tuple(map(float, expected))


@interpreted_only
def test_float64_on_the_triton_backend_runs_the_float64_reference(monkeypatch):
    # Triton passes tau and the threshold as float32 scalars, so float64 goes to the reference, in float64
    monkeypatch.setenv("SPIKEDISTILL_KERNELS", "triton")
    x = torch.tensor([[[2 * (1 - 1e-9)]]], dtype=torch.float64)
    assert select_backend(x) == "reference" and select_backend(x[0, 0], None) == "reference"
    spikes, v = lif_scan(x)
    assert spikes.item() == 0.0 and v.dtype == torch.float64 and v.item() == 1 - 1e-9
    spikes, v = token_shift_lif(x, torch.ones(1, 1, dtype=torch.float64), None, None, 1, {"tau": 2.0})[:2]
    assert spikes.item() == 0.0 and v.dtype == torch.float64 and v.item() == 1 - 1e-9


@interpreted_only
def test_lif_triton_bf16_is_fp32_math():
    x = (torch.randn(1, 6, 5) + 0.8).bfloat16()
    spikes, _ = lif_scan_triton(x)
    assert spikes.dtype == torch.bfloat16 and torch.equal(spikes.float(), lif_scan_reference(x.float())[0])


@interpreted_only
@pytest.mark.parametrize("B,L,C", [(1, 1, 3), (2, 9, 70)])
@pytest.mark.parametrize("with_state", [False, True])
def test_wkv_triton_matches_reference(B, L, C, with_state):
    gen = torch.Generator().manual_seed(0)
    td, tf = (torch.randn(C, generator=gen).requires_grad_() for _ in range(2))
    k = (torch.randn(B, L, C, generator=gen) * 2).requires_grad_()
    v = torch.randn(B, L, C, generator=gen).requires_grad_()
    inputs, state = [td, tf, k, v], None
    if with_state:
        with torch.no_grad():
            _, warm = wkv_reference(td, tf, torch.randn(B, 4, C), torch.randn(B, 4, C))
        state = tuple(s.clone().requires_grad_() for s in warm)
        inputs += list(state)
    y_ref, s_ref = wkv_reference(td, tf, k, v, state)
    y_fast, s_fast = wkv_triton(td, tf, k, v, state)
    _close((y_ref, *s_ref), (y_fast, *s_fast))
    _close(_grads((y_ref, *s_ref), inputs), _grads((y_fast, *s_fast), inputs))


@interpreted_only
def test_wkv_triton_bf16_inputs():
    gen = torch.Generator().manual_seed(0)
    td, tf = torch.randn(4, generator=gen), torch.randn(4, generator=gen)
    k, v = (torch.randn(1, 6, 4, generator=gen).bfloat16() for _ in range(2))
    y, _ = wkv_triton(td, tf, k, v)
    y_ref, _ = wkv_reference(td, tf, k, v)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, y_ref)


@interpreted_only
@pytest.mark.parametrize("case", [("time_first", 20.0), ("time_decay", 200.0)])
def test_wkv_triton_extreme_parameters(case):
    # issue 14 (d): the stable time_first gradient and the clamped decay rate, as in the C kernel
    gen = torch.Generator().manual_seed(3)
    td, tf = torch.randn(4, generator=gen) * 0.5, torch.randn(4, generator=gen) * 0.5
    (tf if case[0] == "time_first" else td)[::2] = case[1]
    k, v = torch.randn(1, 6, 4, generator=gen) * 2, torch.randn(1, 6, 4, generator=gen)
    grads = []
    for fn in (wkv_reference, wkv_triton):
        inputs = [x.clone().requires_grad_() for x in (td, tf, k, v)]
        grads.append(_grads([fn(*inputs)[0]], inputs))
    for a, b in zip(*grads):
        assert torch.isfinite(b).all()
        for group in (slice(0, None, 2), slice(1, None, 2)):
            scale = a[..., group].abs().max().clamp_min(1e-30)
            assert float((a[..., group] - b[..., group]).abs().max() / scale) < 1e-4


@interpreted_only
def test_lif_triton_bf16_membrane_stays_fp32():
    torch.manual_seed(1)
    x = (torch.randn(1, 12, 9) * 1.5 + 0.6).bfloat16()
    spikes, v = lif_scan_triton(x)
    v_t, steps = None, []
    for t in range(x.shape[1]):
        s_t, v_t = lif_scan_triton(x[:, t : t + 1], v_t)
        steps.append(s_t)
    assert v.dtype == torch.float32 and torch.equal(v_t, v) and torch.equal(torch.cat(steps, 1), spikes)


@interpreted_only
@pytest.mark.parametrize("shape", [(1, 1, 1, 4), (1, 2, 21, 8)])
@pytest.mark.parametrize("per_head", [False, True])
def test_sfsa_triton_matches_reference(shape, per_head):
    gen = torch.Generator().manual_seed(0)
    q, k, v = ((torch.rand(shape, generator=gen) < 0.4).float().requires_grad_() for _ in range(3))
    threshold = torch.linspace(1.0, 2.0, shape[1]).requires_grad_() if per_head else 2.0
    inputs = [q, k, v] + ([threshold] if per_head else [])
    ref = sfsa_reference(q, k, v, threshold, surrogate="sigmoid" if per_head else "atan")
    fast = sfsa_triton(q, k, v, threshold, surrogate="sigmoid" if per_head else "atan")
    assert torch.equal(ref[0], fast[0]) and torch.equal(ref[1], fast[1])
    _close(_grads(ref, inputs), _grads(fast, inputs))


@interpreted_only
def test_dispatch_picks_triton_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("SPIKEDISTILL_KERNELS", "triton")
    assert select_backend(torch.randn(2)) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.warns(RuntimeWarning, match="TRITON_INTERPRET"):
        assert select_backend(torch.randn(2)) == "reference"


@interpreted_only
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("n,c,v,chunk", [(1, 1, 1, 4), (13, 8, 37, 5)])
def test_linear_ce_triton_matches_reference(reduction, n, c, v, chunk):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, generator=gen).requires_grad_()
    w = torch.randn(v, c, generator=gen).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[2:3] = -100
    ref = linear_cross_entropy_reference(x, w, labels, reduction)
    fast = linear_cross_entropy_triton(x, w, labels, reduction, chunk_size=chunk)
    _close([ref], [fast])
    _close(torch.autograd.grad(ref * 1.7, (x, w)), torch.autograd.grad(fast * 1.7, (x, w)))


@interpreted_only
def test_fused_lif_composes_the_triton_lif(monkeypatch):
    # No fused Triton kernel: on the Triton backend the producer runs in PyTorch and the LIF in the Triton kernel.
    monkeypatch.setenv("SPIKEDISTILL_KERNELS", "triton")
    gen = torch.Generator().manual_seed(1)
    lif = {"tau": 2.0, "v_threshold": 1.0}
    r, y = torch.randn(2, 5, 6, generator=gen).requires_grad_(), (torch.randn(2, 5, 6, generator=gen) + 1)
    ref, fast = sigmoid_gate_lif_reference(r, y, None, lif), sigmoid_gate_lif(r, y, None, lif)
    assert torch.equal(ref[0], fast[0])
    _close(_grads(ref, (r,)), _grads(fast, (r,)))
    h, mix = torch.randn(1, 4, 3, generator=gen).requires_grad_(), torch.rand(2, 3, generator=gen)
    ref, fast = token_shift_lif_reference(h, mix, None, None, 2, lif), token_shift_lif(h, mix, None, None, 2, lif)
    assert torch.equal(ref[0], fast[0])
    _close(_grads(ref, (h,)), _grads(fast, (h,)))
