"""LIF arithmetic at the edges (issue 23, items 4 and 11).

- Every path (the reference, the C scan, the fused C ops, a step-by-step recurrent run) charges the membrane in
  spikingjelly's order of float operations, so it fires exactly where spikingjelly fires: the expected spikes and
  membranes come from `spikingjelly_lif`, written here in numpy from spikingjelly's LIFNode (torch backend),
  one float32 rounding per operation. spikingjelly itself is not installed. (The Triton kernel's version of
  these checks is in test_kernels_triton.py.)
- float64 neurons compute in float64 (they used to be charged in float32).
"""
import numpy as np
import pytest
import torch

from students.ops import lif_scan, relu_square_lif, sigmoid_gate_lif, token_shift_lif
from students.ops.csrc import library
from students.ops.lif import lif_scan_reference
from students.ops.lif.cpu import lif_scan_cpu

needs_cpu_kernels = pytest.mark.skipif(library() is None, reason="the CPU kernel library did not build (g++)")

# Two currents into a fresh SpikeGPT neuron (tau 2, threshold 1, hard reset): the second charge lands within
# one float32 ulp of the threshold, below it in spikingjelly's order of operations, on it in beta*V + X/tau.
ISSUE_CURRENTS = [0.2592593729496002, 1.8703702688217163]

VARIANTS = [  # every charge kind of the C kernels: tau a power of two, any other tau, no input decay; both resets
    {},
    {"tau": 3.0},
    {"tau": 1.7, "reset": "soft", "v_threshold": 0.8},
    {"tau": 2.0, "decay_input": False},
    {"tau": 3.0, "decay_input": False, "reset": "soft"},
]


def spikingjelly_lif(currents, tau=2.0, v_threshold=1.0, reset="hard", decay_input=True, v0=0.0, dtype=np.float32):
    """spikingjelly's multi-step LIFNode (activation_based/neuron.py, torch backend) over numpy currents [S, N]:
    returns (spikes [S, N], membrane after the last step [N]).

    Charge: neuronal_charge_decay_input_reset0, V = V + (X - V) / tau, or neuronal_charge_no_decay_input_reset0,
    V = V * (1 - 1/tau) + X; fire: heaviside(V - v_threshold); reset: jit_hard_reset with v_reset = 0,
    V = (1 - S) * V + S * 0, or jit_soft_reset, V = V - S * v_threshold. Every operation is rounded to `dtype`,
    and every Python scalar is rounded to `dtype` before it is used, as PyTorch does with a float32 tensor.
    """
    f = np.dtype(dtype).type
    x = np.asarray(currents, dtype=dtype)
    v = np.full(x.shape[1:], v0, dtype=dtype)
    spikes = []
    for x_t in x:
        v = v + (x_t - v) / f(tau) if decay_input else v * f(1.0 - 1.0 / tau) + x_t
        s = (v - f(v_threshold) >= 0).astype(dtype)
        v = (f(1.0) - s) * v + s * f(0.0) if reset == "hard" else v - s * f(v_threshold)
        spikes.append(s)
    return np.stack(spikes), v


def beta_gain_lif(currents, tau=2.0, v_threshold=1.0):
    """The charge as this project computed it before: V * (1 - 1/tau) + X / tau in float32 (hard reset)."""
    f = np.float32
    v, spikes = np.zeros(np.shape(currents)[1:], f), []
    for x_t in np.asarray(currents, f):
        v = f(1 - 1 / tau) * v + f(1 / tau) * x_t
        s = (v >= f(v_threshold)).astype(f)
        v = v * (f(1) - s)
        spikes.append(s)
    return np.stack(spikes)


def near_threshold_currents(n, tau, v_threshold, decay_input, seed=0):
    """[2, n] currents whose second charge lands within a few float32 ulps of the threshold (from rest)."""
    rng = np.random.default_rng(seed)
    first = rng.uniform(-1.0, 1.9, n).astype(np.float32)
    h1 = first / np.float32(tau) if decay_input else first
    # the second current that would reach the threshold exactly in real arithmetic, then nudged by -4..4 ulps
    exact = tau * v_threshold - (tau - 1.0) * h1.astype(np.float64) if decay_input else (
        v_threshold - (1.0 - 1.0 / tau) * h1.astype(np.float64))
    second = exact.astype(np.float32)
    for _ in range(4):
        step = rng.integers(-1, 2, n)
        second = np.where(step > 0, np.nextafter(second, np.float32(np.inf)), second)
        second = np.where(step < 0, np.nextafter(second, np.float32(-np.inf)), second)
    return np.stack([first, second])


def _stepwise(run):
    """The recurrent form of a scan path: one step per call, the membrane carried between calls."""

    def step_by_step(x, v0, lif):
        v, out = v0, []
        for t in range(x.shape[1]):
            s, v = run(x[:, t : t + 1], v, lif)
            out.append(s)
        return torch.cat(out, 1), v

    return step_by_step


def _relu_square(x, v0, lif):
    return relu_square_lif(x.clamp_min(0).sqrt(), v0, lif)


def _token_shift(x, v0, lif):
    # mix 1 and prev 0 (the whole sequence as the T steps of one token): X = 0 + 1 * (h - 0) = h
    return token_shift_lif(x, torch.ones(1, x.shape[2]), torch.zeros(x.shape[1], x.shape[2]), v0, x.shape[1], lif)[:2]


def _scan_paths():
    """name -> (run(x [B, S, N] fp32, v0, lif) -> (spikes, v_last), charged(x) -> the current the neurons get).

    The fused ops share one LIF loop (csrc/fused_ops.cpp); relu^2 and the token shift reach it with currents known
    exactly. The sigmoid gate does not: under -ffast-math its vectorised sigmoid(30) is 1 - 1 ulp in some lanes.
    """
    same = lambda x: x
    runs = {"reference": (lambda x, v0, lif: lif_scan_reference(x, v0, **lif), same)}
    if library() is not None:
        runs.update({
            "cpu": (lambda x, v0, lif: lif_scan_cpu(x, v0, **lif), same),
            "fused relu^2": (_relu_square, lambda x: x.clamp_min(0).sqrt().square()),
            "fused token shift": (_token_shift, same),
        })
    paths = {name: run for name, run in runs.items()}
    paths.update({f"{name} stepwise": (_stepwise(run), charged) for name, (run, charged) in runs.items()})
    return paths


PATHS = _scan_paths()
LIF_IDS = [",".join(f"{k}={v}" for k, v in lif.items()) or "spikegpt" for lif in VARIANTS]


def _check_path(path, currents, opts):
    """Run `path` on currents [S, N] (numpy fp32) and compare with spikingjelly_lif bit for bit; returns its spikes."""
    run, charged = PATHS[path]
    x = torch.from_numpy(currents)[None]
    expected_spikes, expected_v = spikingjelly_lif(charged(x)[0].numpy(), **opts)
    spikes, v = run(x, None, opts)
    assert v.dtype == torch.float32
    assert np.array_equal(spikes[0].numpy(), expected_spikes)
    assert np.array_equal(v[0].numpy(), expected_v)
    return expected_spikes


@pytest.mark.parametrize("path", PATHS)
def test_issue_currents_do_not_fire_in_any_path(path):
    currents = np.array(ISSUE_CURRENTS, dtype=np.float32)[:, None]
    assert spikingjelly_lif(currents)[0][:, 0].tolist() == [0.0, 0.0]
    assert beta_gain_lif(currents)[:, 0].tolist() == [0.0, 1.0]  # the old order of operations fires
    if path.startswith(("reference", "cpu", "fused token shift")):  # these paths charge the current as given
        spikes, _ = PATHS[path][0](torch.from_numpy(currents).view(1, 2, 1), None, {"tau": 2.0, "v_threshold": 1.0})
        assert spikes.flatten().tolist() == [0.0, 0.0]
    _check_path(path, currents, {"tau": 2.0, "v_threshold": 1.0})


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("lif", VARIANTS, ids=LIF_IDS)
def test_near_threshold_currents_fire_exactly_as_spikingjelly(path, lif):
    opts = {"tau": 2.0, "v_threshold": 1.0, "reset": "hard", "decay_input": True, **lif}
    currents = near_threshold_currents(3000, opts["tau"], opts["v_threshold"], opts["decay_input"])
    spikes = _check_path(path, currents, opts)
    assert 0.2 < spikes[1].mean() < 0.8  # the second step sits on the threshold: both outcomes occur


def test_the_old_charge_flips_spikes_on_these_currents():
    # so the randomized test above discriminates: beta*V + X/tau differs from spikingjelly on hundreds of them
    currents = near_threshold_currents(3000, 2.0, 1.0, True)
    assert (beta_gain_lif(currents) != spikingjelly_lif(currents)[0]).sum() > 100


@pytest.mark.parametrize("path", PATHS)
def test_long_sequences_match_spikingjelly(path):
    # many steps: the membrane carries across them, resets included
    currents = np.random.default_rng(3).normal(1.0, 0.35, (200, 70)).astype(np.float32)
    for lif in ({}, {"tau": 3.0, "reset": "soft"}, {"tau": 1.7, "decay_input": False}):
        _check_path(path, currents, {"tau": 2.0, "v_threshold": 1.0, "reset": "hard", "decay_input": True, **lif})


# ---- the charge's gradient: d H / d X = 1/tau, d H / d V = 1 - 1/tau, as autograd forms them ------------------


def _one_step_grads(run, tau, decay_input):
    """d v_last / d x and d v_last / d v0 of one step below threshold (detach_reset: v_last = H exactly)."""
    x, v0 = torch.tensor([[[0.3]]], requires_grad=True), torch.tensor([[0.2]], requires_grad=True)
    lif = {"tau": tau, "v_threshold": 1.0, "decay_input": decay_input, "detach_reset": True}
    _, v = run(x, v0, lif)
    gx, gv0 = torch.autograd.grad(v.sum(), (x, v0))
    return gx.item(), gv0.item()


# relu^2 is left out: it multiplies the gradient by 2 relu(z); its LIF loop is the token shift's
@pytest.mark.parametrize("path", [p for p in PATHS if not p.endswith("stepwise") and p != "fused relu^2"])
@pytest.mark.parametrize("tau,decay_input", [(2.0, True), (3.0, True), (3.0, False)])
def test_charge_gradient_is_that_of_spikingjellys_expression(path, tau, decay_input):
    f = np.float32
    if decay_input:  # H = V + (X - V) / tau: autograd gives g / tau to X and g - g / tau to V
        expected = (f(1) / f(tau), f(1) - f(1) / f(tau))
    else:  # H = V * float32(1 - 1/tau) + X
        expected = (f(1), f(1.0 - 1.0 / tau))
    assert _one_step_grads(PATHS[path][0], tau, decay_input) == (float(expected[0]), float(expected[1]))


# ---- float64 neurons compute in float64 --------------------------------------------------------------------


@pytest.mark.parametrize("kernels", ["auto", "cpu", "reference"])
def test_float64_lif_is_charged_in_float64(monkeypatch, kernels):
    monkeypatch.setenv("SPIKEDISTILL_KERNELS", kernels)
    current = 2 * (1 - 1e-9)
    assert np.float32(current) == 2.0  # in float32 the current is 2.0 and the neuron fires at once
    spikes, v = lif_scan(torch.tensor([[[current]]], dtype=torch.float64))
    assert spikes.dtype == v.dtype == torch.float64
    assert spikes.item() == 0.0 and v.item() == current / 2 == 1 - 1e-9


@pytest.mark.parametrize("kernels", ["auto", "reference"])
def test_float64_membrane_is_not_lowered_by_a_float32_current(monkeypatch, kernels):
    # a float64 state carried into a float32 input: charged in float64 (float32 would round v0 up to 1.0)
    monkeypatch.setenv("SPIKEDISTILL_KERNELS", kernels)
    v0 = torch.tensor([[1 - 1e-12]], dtype=torch.float64)
    spikes, v = lif_scan(torch.tensor([[[1.0]]]), v0)
    assert spikes.dtype == torch.float32 and v.dtype == torch.float64
    assert spikes.item() == 0.0 and v.item() == (1 - 1e-12) + (1.0 - (1 - 1e-12)) / 2


@pytest.mark.parametrize("kernels", ["auto", "reference"])
def test_float64_fused_ops_are_charged_in_float64(monkeypatch, kernels):
    monkeypatch.setenv("SPIKEDISTILL_KERNELS", kernels)
    lif = {"tau": 2.0, "v_threshold": 1.0}
    current = torch.tensor([[[2 * (1 - 1e-9)]]], dtype=torch.float64)
    outs = {
        "gate": sigmoid_gate_lif(torch.full_like(current, 40.0), current, None, lif),  # sigmoid(40) = 1.0 in fp64
        "relu^2": relu_square_lif(current.sqrt(), None, lif),
        "token shift": token_shift_lif(current, torch.ones(1, 1, dtype=torch.float64), None, None, 1, lif)[:2],
    }
    for name, (spikes, v) in outs.items():
        assert spikes.dtype == v.dtype == torch.float64, name
        assert spikes.item() == 0.0 and abs(v.item() - (1 - 1e-9)) < 1e-15, name


def _away_from_threshold(tau, decay_input, reset, margin=1e-3):
    """x [1, 6, 5], v0 [1, 5] (float64) whose every charge stays `margin` away from the threshold 1, with spikes."""
    for seed in range(100):
        gen = torch.Generator().manual_seed(seed)
        x = torch.rand(1, 6, 5, generator=gen, dtype=torch.float64) * 2.4 - 0.2
        v0 = torch.rand(1, 5, generator=gen, dtype=torch.float64) * 0.8
        v, charges = v0, []
        for x_t in x.unbind(1):
            h = v + (x_t - v) / tau if decay_input else v * (1 - 1 / tau) + x_t
            s = (h >= 1).double()
            v = h * (1 - s) if reset == "hard" else h - s
            charges.append(h)
        h = torch.stack(charges)
        if (h - 1).abs().min() > margin and 0 < (h >= 1).double().mean() < 1:
            return x, v0
    raise AssertionError("no input away from the threshold")


@pytest.mark.parametrize("tau,decay_input", [(2.0, True), (3.0, True), (3.0, False)])
@pytest.mark.parametrize("reset", ["hard", "soft"])
def test_float64_gradcheck_of_the_membrane(tau, decay_input, reset):
    # The spikes' gradient is the surrogate's (no finite difference sees it); the membrane with detach_reset is
    # piecewise linear in x and v0, so away from the threshold its analytic gradient must equal finite differences.
    x, v0 = _away_from_threshold(tau, decay_input, reset)
    lif = {"tau": tau, "v_threshold": 1.0, "decay_input": decay_input, "reset": reset, "detach_reset": True}
    assert torch.autograd.gradcheck(lambda a, b: lif_scan(a, b, **lif)[1], (x.requires_grad_(), v0.requires_grad_()))
    # the fused token shift + LIF, every input: with mix 1 each current is the token itself, up to rounding
    mix = torch.ones(1, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, m, b: token_shift_lif(a, m, None, b, 1, lif)[1], (x, mix, v0))
