"""KD losses against hand computations (plain-Python math), and chunked logit losses against naive ones."""

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.losses import chunked_logit_losses, kd_loss

S = [[1.0, 2.0, 0.5, -1.0], [0.0, -0.5, 3.0, 1.0]]   # student logits, 2 tokens, V = 4
T = [[2.0, 0.0, 1.0, -2.0], [0.5, 0.5, 2.0, -1.0]]   # teacher logits


def _softmax(xs, tau=1.0):
    m = max(x / tau for x in xs)
    e = [math.exp(x / tau - m) for x in xs]
    return [v / sum(e) for v in e]


def _kl(a, b):
    return sum(x * math.log(x / y) for x, y in zip(a, b) if x > 0)


def _hand(kind, tau, beta=0.5):
    out = []
    for s, t in zip(S, T):
        p, q = _softmax(s, tau), _softmax(t, tau)
        if kind == "forward_kl":
            d = _kl(q, p)
        elif kind == "reverse_kl":
            d = _kl(p, q)
        else:
            m = [beta * x + (1 - beta) * y for x, y in zip(q, p)]
            d = beta * _kl(q, m) + (1 - beta) * _kl(p, m)
        out.append(tau * tau * d)
    return out


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_dense_kd_matches_hand_computation(kind, tau):
    got = kd_loss(torch.tensor(S), torch.tensor(T), kind=kind, temperature=tau, beta=0.3)
    assert got.shape == (2,)
    torch.testing.assert_close(got, torch.tensor(_hand(kind, tau, 0.3)), rtol=1e-5, atol=1e-6)


def test_jsd_endpoints_are_the_kls():
    s, t = torch.tensor(S), torch.tensor(T)
    torch.testing.assert_close(kd_loss(s, t, "jsd", 2.0, beta=0.0), kd_loss(s, t, "forward_kl", 2.0))
    torch.testing.assert_close(kd_loss(s, t, "jsd", 2.0, beta=1.0), kd_loss(s, t, "reverse_kl", 2.0))


def test_jsd_jumps_at_its_endpoints():
    # the generalized JSD tends to 0 at both ends (~beta KL(q || p), ~(1 - beta) KL(p || q)); beta = 0 and 1
    # are forward and reverse KL by convention, not by continuity
    s, t = torch.tensor(S), torch.tensor(T)
    fwd, rev = torch.tensor(_hand("forward_kl", 1.0)), torch.tensor(_hand("reverse_kl", 1.0))
    torch.testing.assert_close(kd_loss(s, t, "jsd", 1.0, beta=1e-3), 1e-3 * fwd, rtol=0.01, atol=0)
    torch.testing.assert_close(kd_loss(s, t, "jsd", 1.0, beta=1 - 1e-3), 1e-3 * rev, rtol=0.01, atol=0)
    torch.testing.assert_close(kd_loss(s, t, "jsd", 1.0, beta=0.0), fwd)
    torch.testing.assert_close(kd_loss(s, t, "jsd", 1.0, beta=1.0), rev)


def test_kd_zero_when_student_equals_teacher():
    t = torch.tensor(T)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        assert kd_loss(t, t, kind, 2.0).abs().max() < 1e-6


class Sparse:
    def __init__(self, ids, logprobs, tail_mass):
        self.ids, self.logprobs, self.tail_mass = ids, logprobs, tail_mass


def _sparse_from_dense(teacher_logits, k, tau):
    """Top-k targets of the teacher at temperature tau (what the cache stores): ids, log-probs, tail mass."""
    logp = torch.log_softmax(teacher_logits / tau, -1)
    vals, ids = logp.topk(k, dim=-1)
    return Sparse(ids, vals, (1 - vals.exp().sum(-1)).clamp(0, 1))


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_sparse_with_k_equal_vocab_equals_dense(kind):
    torch.manual_seed(0)
    s, t = torch.randn(5, 11), torch.randn(5, 11) * 2
    dense = kd_loss(s, t, kind, temperature=2.0)
    sparse = kd_loss(s, _sparse_from_dense(t, 11, 2.0), kind, temperature=2.0)
    torch.testing.assert_close(sparse, dense, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_sparse_tail_bucket_matches_hand_computation(kind):
    tau = 2.0
    target = _sparse_from_dense(torch.tensor(T), 2, tau)
    got = kd_loss(torch.tensor(S), target, kind, temperature=tau)
    want = []
    for row, (s, t) in enumerate(zip(S, T)):
        ids = target.ids[row].tolist()
        # both sides tempered over the whole vocabulary, then bucketed: the 2 stored tokens + the tail
        q_full, p_full = _softmax(t, tau), _softmax(s, tau)
        q = [q_full[i] for i in ids] + [sum(q_full[i] for i in range(4) if i not in ids)]
        p = [p_full[i] for i in ids] + [sum(p_full[i] for i in range(4) if i not in ids)]
        if kind == "forward_kl":
            d = _kl(q, p)
        elif kind == "reverse_kl":
            d = _kl(p, q)
        else:
            m = [0.5 * x + 0.5 * y for x, y in zip(q, p)]
            d = 0.5 * _kl(q, m) + 0.5 * _kl(p, m)
        want.append(tau * tau * d)
    torch.testing.assert_close(got, torch.tensor(want), rtol=1e-5, atol=1e-6)


def test_sparse_tail_is_stable_when_student_is_confident():
    s = torch.tensor([[60.0, -30.0, -30.0, -30.0]])
    target = Sparse(torch.tensor([[0]]), torch.tensor([[-0.01]]), torch.tensor([1 - math.exp(-0.01)]))
    s.requires_grad_(True)
    loss = kd_loss(s, target, "reverse_kl", 1.0)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(s.grad).all()


def _naive(h, w, labels, t_logits, kind, tau, target=None):
    logits = h @ w.T
    valid = labels != -100
    kd = (kd_loss(logits, t_logits if target is None else target, kind, tau) * valid).sum()
    return kd, F.cross_entropy(logits, labels, ignore_index=-100, reduction="sum")


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_chunked_logit_losses_match_naive_values_and_grads(sparse, chunk):
    torch.manual_seed(1)
    n, c, v = 7, 5, 13
    h = torch.randn(n, c, requires_grad=True)
    w = torch.randn(v, c, requires_grad=True)
    labels = torch.randint(0, v, (n,))
    labels[2] = -100
    t_logits = torch.randn(n, v)
    target = _sparse_from_dense(t_logits, 4, 2.0) if sparse else None
    kd0, ce0 = _naive(h, w, labels, t_logits, "forward_kl", 2.0, target)
    g0 = torch.autograd.grad(0.3 * kd0 + 0.7 * ce0, [h, w])
    teacher = target if sparse else (lambda rows: t_logits[rows])
    out = chunked_logit_losses(h, lambda x: x @ w.T, labels, teacher, "forward_kl", 2.0, chunk_size=chunk)
    g1 = torch.autograd.grad(0.3 * out["kd_sum"] + 0.7 * out["ce_sum"], [h, w])
    assert int(out["n_tokens"]) == n - 1
    torch.testing.assert_close(out["kd_sum"], kd0)
    torch.testing.assert_close(out["ce_sum"], ce0)
    for a, b in zip(g0, g1):
        torch.testing.assert_close(a, b)


def test_chunked_logit_losses_without_teacher_is_ce_only():
    torch.manual_seed(2)
    h, w = torch.randn(6, 4), torch.randn(9, 4)
    labels = torch.randint(0, 9, (6,))
    out = chunked_logit_losses(h, lambda x: x @ w.T, labels, None, chunk_size=4)
    assert float(out["kd_sum"]) == 0.0
    torch.testing.assert_close(out["ce_sum"], F.cross_entropy(h @ w.T, labels, reduction="sum"))


def test_bad_kind_names_the_recipe_key():
    with pytest.raises(ValueError, match="distill.kd.kind"):
        kd_loss(torch.zeros(1, 3), torch.zeros(1, 3), kind="tvd")


@pytest.mark.parametrize("sparse", [False, True])
def test_fused_impl_is_selected_and_matches_chunked(sparse):
    pytest.importorskip("pipeline.fused_kd")
    from pipeline.losses import logit_losses

    torch.manual_seed(5)
    head = torch.nn.Linear(6, 11, bias=False)
    h = torch.randn(9, 6)
    labels = torch.randint(0, 11, (9,))
    t_logits = torch.randn(9, 11)
    teacher = _sparse_from_dense(t_logits, 3, 2.0) if sparse else (lambda rows: t_logits[rows])
    a = logit_losses(h, head, labels, teacher, "jsd", 2.0, 4, beta=0.3, impl="chunked")
    b = logit_losses(h, head, labels, teacher, "jsd", 2.0, 4, beta=0.3, impl="fused")
    for k in ("kd_sum", "ce_sum"):
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5)
