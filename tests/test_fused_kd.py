"""pipeline.fused_kd.fused_head_kd_loss against the naive path: full logits + pipeline.losses (kd_loss, CE)."""
import pytest
import torch
import torch.nn.functional as F

from pipeline.errors import ConfigError
from pipeline.fused_kd import fused_head_kd_loss
from pipeline.losses import kd_loss
from teachers.cache import SparseTargets

N, C, V = 29, 12, 40


def _setup(seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(N, C, generator=gen).to(dtype).requires_grad_()
    w = (torch.randn(V, C, generator=gen) * 0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, V, (N,), generator=gen)
    labels[::4] = -100
    teacher = torch.randn(N, V, generator=gen) * 2
    return h, w, labels, teacher


def _sparse(teacher, k, tau=1.0):
    """Top-k targets of the teacher at temperature tau (what the cache stores for a run at tau)."""
    top = torch.log_softmax(teacher / tau, -1).topk(k, -1)
    return SparseTargets(top.indices, top.values, (1 - top.values.exp().sum(-1)).clamp(0, 1))


def _naive(h, w, labels, target, kind, tau, beta):
    """Full [N, V] logits, then pipeline.losses.kd_loss and cross-entropy: the definition."""
    logits = h.float() @ w.float().t()
    valid = labels != -100
    ce = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    kd = (kd_loss(logits, target, kind, tau, beta) * valid).sum() if target is not None else ce * 0
    return kd, ce


def _check(h, w, labels, target, kind="forward_kl", tau=1.0, beta=0.5, chunk=8, weights=(0.7, 1.3), **kw):
    kd_ref, ce_ref = _naive(h, w, labels, target, kind, tau, beta)
    out = fused_head_kd_loss(h, w, labels, target, kind, tau, chunk, jsd_beta=beta, **kw)
    torch.testing.assert_close(out["kd_sum"], kd_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out["ce_sum"], ce_ref, rtol=1e-5, atol=1e-4)
    assert out["n_tokens"].item() == int((labels != -100).sum())
    g_ref = torch.autograd.grad(weights[0] * kd_ref + weights[1] * ce_ref, (h, w))
    g_fused = torch.autograd.grad(weights[0] * out["kd_sum"] + weights[1] * out["ce_sum"], (h, w))
    for a, b in zip(g_ref, g_fused):
        torch.testing.assert_close(b.float(), a.float(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
@pytest.mark.parametrize("target_kind", ["dense", "callable", "top5", "topV"])
def test_fused_matches_naive(kind, tau, target_kind):
    h, w, labels, teacher = _setup()
    target = {
        "dense": teacher,
        "callable": lambda rows: teacher[rows],
        "top5": _sparse(teacher, 5, tau),
        "topV": _sparse(teacher, V, tau),
    }[target_kind]
    naive_target = teacher if target_kind == "callable" else target
    kd_ref, _ = _naive(h, w, labels, naive_target, kind, tau, 0.5)
    _check(h, w, labels, naive_target if target_kind != "callable" else teacher, kind, tau)
    out = fused_head_kd_loss(h, w, labels, target, kind, tau, 8)
    torch.testing.assert_close(out["kd_sum"], kd_ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("beta", [0.0, 0.2, 1.0])
def test_fused_jsd_beta(beta):
    h, w, labels, teacher = _setup(1)
    _check(h, w, labels, teacher, "jsd", 1.5, beta)


@pytest.mark.parametrize("chunk", [3, 29, 1000])
def test_fused_any_chunk_size_and_ce_only(chunk):
    h, w, labels, teacher = _setup(2)
    _check(h, w, labels, teacher, chunk=chunk)
    _check(h, w, labels, None, chunk=chunk)


@pytest.mark.parametrize("target_kind", ["dense", "top5"])
def test_fused_loss_weights_compute_gradients_in_forward(target_kind):
    h, w, labels, teacher = _setup(3)
    target = teacher if target_kind == "dense" else _sparse(teacher, 5, 2.0)
    # the promise holds up to a common scale (the trainer divides by the token count afterwards)
    _check(h, w, labels, target, "reverse_kl", 2.0, weights=(0.35, 0.65), loss_weights=(0.7, 1.3))
    out = fused_head_kd_loss(h, w, labels, target, "forward_kl", 1.0, 8, loss_weights=(1.0, 1.0))
    with pytest.raises(RuntimeError, match="loss_weights"):
        (out["kd_sum"] + 3.0 * out["ce_sum"]).backward()


def test_fused_reference_backend_is_the_same(monkeypatch):
    monkeypatch.setenv("SPIKEDISTILL_KERNELS", "reference")  # plain-torch chunk maths instead of the C rows
    h, w, labels, teacher = _setup(4)
    _check(h, w, labels, teacher, "jsd", 2.0)


def test_fused_bf16_inputs():
    h, w, labels, teacher = _setup(5, torch.bfloat16)
    out = fused_head_kd_loss(h, w, labels, teacher, "forward_kl", 2.0, 8)
    kd_ref, _ce_ref = _naive(h, w, labels, teacher, "forward_kl", 2.0, 0.5)
    torch.testing.assert_close(out["kd_sum"], kd_ref, rtol=1e-4, atol=1e-3)
    (out["kd_sum"] + out["ce_sum"]).backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16


@pytest.mark.parametrize("backend", ["auto", "reference"])  # the C rows and the plain-torch chunk maths
@pytest.mark.parametrize("target_kind", ["dense", "top5"])
def test_fused_is_fp32_inside_autocast(monkeypatch, backend, target_kind):
    # mixed-precision training (accelerate's bf16) runs the loss inside an autocast region, which would make
    # the chunks' head matmuls bf16 (on CPU the C rows then refused them); the sums stay those of fp32 maths
    monkeypatch.setenv("SPIKEDISTILL_KERNELS", backend)
    h, w, labels, teacher = _setup(6)
    target = teacher if target_kind == "dense" else _sparse(teacher, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = fused_head_kd_loss(h, w, labels, target, "forward_kl", 2.0, 8, loss_weights=(0.5, 0.5))
    kd_ref, ce_ref = _naive(h, w, labels, target, "forward_kl", 2.0, 0.5)
    torch.testing.assert_close(out["kd_sum"], kd_ref, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(out["ce_sum"], ce_ref, rtol=1e-5, atol=1e-4)
    g_ref = torch.autograd.grad(0.5 * kd_ref + 0.5 * ce_ref, (h, w))
    for a, b in zip(g_ref, torch.autograd.grad(0.5 * out["kd_sum"] + 0.5 * out["ce_sum"], (h, w))):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-5)


def test_fused_rejects_bad_arguments():
    h, w, labels, teacher = _setup()
    with pytest.raises(ConfigError, match="distill.kd.kind"):
        fused_head_kd_loss(h, w, labels, teacher, "kl")
    with pytest.raises(ConfigError, match="jsd_beta"):
        fused_head_kd_loss(h, w, labels, teacher, "jsd", jsd_beta=1.5)
    with pytest.raises(ValueError, match="head_weight"):
        fused_head_kd_loss(h, w.t(), labels, teacher)


def test_fused_rejects_mismatched_vocab_and_labels():
    h, w, labels, teacher = _setup()
    with pytest.raises(ValueError, match="teacher vocab"):
        fused_head_kd_loss(h, w, labels, teacher[:, :-1])
    bad = labels.clone()
    bad[1] = V  # out of the student's vocabulary
    with pytest.raises(ValueError, match="labels"):
        fused_head_kd_loss(h, w, bad, teacher)


def test_distill_objective_defaults_to_fused_with_the_chunked_gradients():
    # the fused path is the default (no recipe names it) and, with the gradient computed in its forward from
    # the objective's STA/HTA weights, trains exactly like the chunked reference
    from pipeline.losses import DistillObjective
    from pipeline.schema import KDConfig
    from students import SpikeGPTConfig, SpikeGPTForCausalLM

    assert KDConfig().impl == "fused"
    torch.manual_seed(0)
    student = SpikeGPTForCausalLM(SpikeGPTConfig.from_preset("tiny", vocab_size=V))
    ids = torch.randint(0, V, (2, 9))
    top = (torch.randn(2, 9, V) / 2.0).log_softmax(-1).topk(6, -1)  # the teacher at the run's tau 2
    targets = SparseTargets(top.indices, top.values, 1 - top.values.exp().sum(-1))
    kd = {"kind": "forward_kl", "temperature": 2.0, "chunk_size": 5}
    grads = {}
    for impl in (None, "chunked"):
        objective = DistillObjective(student, {"sta": 0.3, "hta": 0.7}, kd={**kd, **({"impl": impl} if impl else {})})
        student.zero_grad()
        out = objective(ids, targets=targets)
        (out["loss"] / 16).backward()  # the trainer's 1 / tokens: a common scale the fused path accepts
        grads[impl] = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    assert grads[None].keys() == grads["chunked"].keys()
    for name, g in grads["chunked"].items():
        torch.testing.assert_close(grads[None][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_fused_rejects_sparse_ids_outside_the_vocab():
    h, w, labels, teacher = _setup()
    bad = _sparse(teacher, 5)
    bad.ids[0, 0] = V  # the C rows index the logits with these ids: never let one out of range through
    with pytest.raises(ValueError, match="top-k ids"):
        fused_head_kd_loss(h, w, labels, bad)
    with pytest.raises(ValueError, match="sparse targets"):
        fused_head_kd_loss(h, w, labels, _sparse(teacher[:-1], 5))


def test_logit_losses_picks_the_path():
    from pipeline.losses import logit_losses

    h, _w, labels, teacher = _setup(6)
    biased = torch.nn.Linear(C, V)  # the fused kernel has no bias: the chunked path runs instead
    with torch.no_grad():
        out = logit_losses(h, biased, labels, teacher, "forward_kl", 2.0, 8)
        logits = biased(h)
    ce_ref = F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")
    kd_ref = (kd_loss(logits, teacher, "forward_kl", 2.0) * (labels != -100)).sum()
    torch.testing.assert_close(out["ce_sum"], ce_ref)
    torch.testing.assert_close(out["kd_sum"], kd_ref)
    with pytest.raises(ValueError, match="distill.kd.impl"):
        logit_losses(h, biased, labels, teacher, "forward_kl", 2.0, 8, impl="fast")


def test_fused_kd_does_not_import_the_losses_module():
    # issue 14 item 6: pipeline.fused_kd and pipeline.losses share pipeline.kd_targets, one direction only
    import subprocess
    import sys
    from pathlib import Path

    import pipeline.kd_targets

    code = "import sys, pipeline.fused_kd; assert 'pipeline.losses' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
    source = Path(pipeline.kd_targets.__file__).read_text()
    assert "import pipeline" not in source and "from pipeline" not in source
