"""Cached KD at temperature tau against online KD at tau, on the real bundled teacher (issue 21).

The cache stores the top-64 of the tempered teacher softmax(z / tau) and its tail mass (teachers.cache.
topk_targets); pipeline.losses.kd_loss maps the tempered student onto the same 64 ids + tail bucket. The truth
is online forward KL over the full vocabulary, tau^2 KL(softmax(z / tau) || softmax(s / tau)), written here in
float64 and differentiated by autograd. Students: a randomly initialised `demo` spiking student (4 x 128) and
the teacher's logits plus N(0, 1) noise. The figure is the cosine between the two gradients w.r.t. the
student's logits, over all tokens at once, with the ratio of their norms.

Issue 21 asks for a cosine >= 0.99 at tau 1, 2 and 4. A top-64 cache with one tail bucket keeps none of the
tail's shape, and the tempered teacher puts most of its mass there at tau >= 2 (79% outside its top 64 at
tau 2, 98% at tau 4; bench/kd_cache.py), so only tau 1 meets it: tau 2 gives 0.97-0.98 and tau 4 0.47-0.57 on
this text. Those cases are strict xfails of `test_cached_gradient_meets_the_issue_bar` (they record the bar and
fail loudly if they start passing); `test_cached_gradient_is_tau_kd` guards what the cache does reach.
The hidden store (teacher_cache.store=hidden: the teacher's last hidden states in bf16 and its head, the full
logits recomputed in the loss) meets the bar at every tau and for reverse KL and JSD too:
`test_hidden_store_meets_the_issue_bar_at_every_tau_and_kind`, through a real cache build and read.
"""

import pytest
import torch

from pipeline.losses import kd_loss
from teachers.cache import topk_targets

pytestmark = pytest.mark.slow

K, TOKENS = 64, 320
SHAPE_LOST = "a top-64 cache keeps no tail shape; the tempered teacher's mass is mostly in its tail at tau >= 2"


@pytest.fixture(scope="module")
def teacher():
    from teachers import load_teacher

    return load_teacher("smollm2-135m", dtype=torch.float32)


@pytest.fixture(scope="module")
def setup(teacher):
    from students import SpikeGPTConfig, SpikeGPTForCausalLM
    from teachers.data import bundled_corpus, read_text

    text = read_text(bundled_corpus()["persuasion"])[5000:9000]
    ids = teacher.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[:, :TOKENS]
    assert ids.shape[1] == TOKENS
    torch.manual_seed(0)
    student = SpikeGPTForCausalLM(SpikeGPTConfig.from_preset("demo", vocab_size=teacher.vocab_size)).eval()
    with torch.no_grad():
        z = teacher(ids, hidden_states=False).logits[0].float()
        h = student(ids, skip_logits=True).head_input[0].float()
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(1))
    logits = {"random": (h @ student.lm_head.weight.t()).detach(), "noisy": z + noise}
    return {"z": z, "h": h, "head": student.lm_head.weight.detach(), "students": logits, "measured": {}}


def _online_grad(s, z, tau, kind="forward_kl", beta=0.5):
    """d/ds of tau^2 D(softmax(z / tau), softmax(s / tau)) summed over tokens, float64: D = KL(q || p), KL(p || q)
    or the generalized JSD beta KL(q || m) + (1 - beta) KL(p || m), m = beta q + (1 - beta) p (GKD, arXiv
    2306.13649)."""
    s = s.double().requires_grad_()
    log_q, log_p = torch.log_softmax(z.double() / tau, -1), torch.log_softmax(s / tau, -1)
    if kind == "forward_kl":
        d = log_q.exp() * (log_q - log_p)
    elif kind == "reverse_kl":
        d = log_p.exp() * (log_p - log_q)
    else:
        m = beta * log_q.exp() + (1 - beta) * log_p.exp()
        d = beta * log_q.exp() * (log_q - m.log()) + (1 - beta) * log_p.exp() * (log_p - m.log())
    return torch.autograd.grad(tau**2 * d.sum(), s)[0]


def _cached_grad(s, z, tau):
    s = s.clone().requires_grad_()
    return torch.autograd.grad(kd_loss(s, topk_targets(z, K, tau), "forward_kl", tau).sum(), s)[0].double()


def _cosine_and_ratio(a, b):
    return float((a * b).sum() / (a.norm() * b.norm())), float(a.norm() / b.norm())


def _measure(setup, student, tau):
    """(cosine, norm ratio) of the cached and online gradients, computed once per module."""
    key = (student, tau)
    if key not in setup["measured"]:
        s, z = setup["students"][student], setup["z"]
        setup["measured"][key] = _cosine_and_ratio(_cached_grad(s, z, tau), _online_grad(s, z, tau))
        print(f"{student} tau {tau}: cosine {setup['measured'][key][0]:.4f}, norm ratio {setup['measured'][key][1]:.3f}")
    return setup["measured"][key]


@pytest.mark.parametrize("student", ["random", "noisy"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_cached_gradient_is_tau_kd(setup, student, tau):
    # at the scale of online tau^2 KD, pointing the same way up to the tail's shape (0.78 with the format-1
    # cache at tau 2 in issue 21, at 2.8x the norm); tau 1 meets issue 21's bar of 0.99
    cosine, ratio = _measure(setup, student, tau)
    assert cosine >= (0.99 if tau == 1.0 else 0.95) and 0.95 <= ratio <= 1.05, (cosine, ratio)


@pytest.mark.xfail(strict=True, reason=SHAPE_LOST)
@pytest.mark.parametrize("student", ["random", "noisy"])
@pytest.mark.parametrize("tau", [2.0, 4.0])
def test_cached_gradient_meets_the_issue_bar(setup, student, tau):
    cosine, ratio = _measure(setup, student, tau)
    assert cosine >= 0.99 and 0.95 <= ratio <= 1.05, (cosine, ratio)


def _old_cached_grad(s, z, tau):
    """The format-1 cache: temperature-1 top-k and tail, both sides bucketed at temperature 1 and then tempered
    as bucket distributions."""
    target = topk_targets(z, K, 1.0)
    s = s.double().requires_grad_()
    log_s = torch.log_softmax(s, -1)
    a = torch.cat([log_s.gather(-1, target.ids),
                   torch.logsumexp(log_s.scatter(-1, target.ids, float("-inf")), -1, keepdim=True)], -1)
    t = torch.cat([target.logprobs.double(), target.tail_mass.double().log().unsqueeze(-1)], -1)
    log_p, log_q = torch.log_softmax(a / tau, -1), torch.log_softmax(t / tau, -1)
    return torch.autograd.grad(tau**2 * (log_q.exp() * (log_q - log_p)).sum(), s)[0]


def test_tempering_the_buckets_is_not_tau_kd(setup):
    # the previous cache's loss at tau 2 (issue 21: cosine 0.78 on the demo student) fails the guard above
    s, z = setup["students"]["random"], setup["z"]
    cosine, ratio = _cosine_and_ratio(_old_cached_grad(s, z, 2.0), _online_grad(s, z, 2.0))
    print(f"format-1 cache, random tau 2: cosine {cosine:.4f}, norm ratio {ratio:.3f}")
    assert cosine < 0.95 and ratio > 1.5


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_fused_path_equals_the_reference_at_full_vocabulary(setup, tau):
    # the C row kernel (CPU) over 49,152 logits per row, against the chunked float64 reference (pipeline.losses)
    from pipeline.fused_kd import fused_head_kd_loss
    from pipeline.losses import chunked_logit_losses

    h, w, z = setup["h"], setup["head"], setup["z"]
    labels = z.argmax(-1)
    target = topk_targets(z, K, tau)
    got = {}
    for impl in ("chunked", "fused"):
        hh = h.clone().requires_grad_()
        if impl == "chunked":
            r = chunked_logit_losses(hh, lambda x: x @ w.t(), labels, target, "forward_kl", tau, 128)
        else:
            r = fused_head_kd_loss(hh, w, labels, target, "forward_kl", tau, 128)
        got[impl] = (r["kd_sum"].detach(), torch.autograd.grad(r["kd_sum"], hh)[0])
    torch.testing.assert_close(got["fused"][0], got["chunked"][0], rtol=1e-5, atol=0)
    g, ref = got["fused"][1], got["chunked"][1]
    assert float((g - ref).abs().max() / ref.abs().max()) < 1e-4


@pytest.fixture(scope="module")
def hidden_store(teacher, tmp_path_factory):
    """A hidden store (bf16, the default value dtype) built by the teacher_cache code over 5 rows x 64 tokens of
    Persuasion, its batch read back, the online fp32 logits of the same rows and the two stand-in students."""
    from students import SpikeGPTConfig, SpikeGPTForCausalLM
    from teachers.cache import HiddenCache, build_teacher_cache
    from teachers.data import TokenDataset, bundled_corpus, prepare_corpus, read_text

    root = tmp_path_factory.mktemp("hidden_store")
    (root / "text.txt").write_text(read_text(bundled_corpus()["persuasion"])[5000:9000])
    prepare_corpus([root / "text.txt"], teacher.tokenizer, root / "data", seq_len=64, val_fraction=0.0)
    build_teacher_cache(teacher, root / "data", root / "cache", batch_size=5, progress=False, store="hidden")
    ds, cache = TokenDataset(root / "data"), HiddenCache(root / "cache")
    rows = list(range(5))
    ids = torch.stack([ds[r] for r in rows])
    with torch.no_grad():
        z = teacher(ids, hidden_states=False).logits.reshape(-1, teacher.vocab_size).float()
    batch = cache.batch(rows)
    noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(2))
    torch.manual_seed(3)
    student = SpikeGPTForCausalLM(SpikeGPTConfig.from_preset("demo", vocab_size=teacher.vocab_size)).eval()
    with torch.no_grad():
        random = student(ids).logits.reshape(-1, teacher.vocab_size).float()
    return {"z": z, "hidden": batch.hidden.reshape(-1, batch.hidden.shape[-1]), "head": batch.head,
            "students": {"noisy": z + noise, "random": random}}


@pytest.mark.parametrize("student", ["noisy", "random"])
@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("tau", [1.0, 2.0, 4.0])
def test_hidden_store_meets_the_issue_bar_at_every_tau_and_kind(hidden_store, student, kind, tau):
    from pipeline.losses import chunked_logit_losses

    s, z, hidden, head = hidden_store["students"][student], hidden_store["z"], hidden_store["hidden"], \
        hidden_store["head"]
    x = s.clone().requires_grad_()
    got = chunked_logit_losses(x, lambda h: h, z.argmax(-1), lambda rows: head(hidden[rows]), kind, tau, 128)
    grad = torch.autograd.grad(got["kd_sum"], x)[0].double()
    cosine, ratio = _cosine_and_ratio(grad, _online_grad(s, z, tau, kind))
    print(f"hidden store, {student} {kind} tau {tau}: cosine {cosine:.5f}, norm ratio {ratio:.4f}")
    assert cosine >= 0.99 and 0.95 <= ratio <= 1.05, (cosine, ratio)
