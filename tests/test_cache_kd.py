"""With k = vocab size the KD loss from the cache equals the one from the online teacher (issue 3), at the
temperature the cache was built for.

Uses pipeline.losses.kd_loss, whose sparse targets are the k stored tokens + one tail bucket of the teacher at
temperature tau, with the tempered student mapped onto the same buckets.
"""

import pytest
import torch

from pipeline.losses import kd_loss
from teachers import load_teacher
from teachers.cache import TeacherCache, build_teacher_cache
from teachers.data import TokenDataset, prepare_corpus

V, SEQ = 320, 16
TEXT = "In the beginning God created the heaven and the earth. And the earth was without form.\n" * 5


@pytest.fixture(scope="module")
def setup(tiny_teacher_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("kd")
    teacher = load_teacher(tiny_teacher_dir, cache_dir=root)
    (root / "doc.txt").write_text(TEXT)
    prepare_corpus([root / "doc.txt"], teacher.tokenizer, root / "data", seq_len=SEQ, val_fraction=0.0)
    ds = TokenDataset(root / "data")
    rows = torch.stack([ds[i] for i in range(len(ds))])
    teacher_logits = teacher(rows).logits.reshape(-1, V)
    student_logits = torch.randn(teacher_logits.shape, generator=torch.Generator().manual_seed(0)) * 2
    return teacher, root, teacher_logits, student_logits


def _cached_loss(setup, k, value_dtype, kind="forward_kl", tau=1.0):
    teacher, root, _, student_logits = setup
    out = root / f"cache-{k}-{value_dtype}-{tau}"
    build_teacher_cache(teacher, root / "data", out, k=k, value_dtype=value_dtype, progress=False, temperature=tau)
    cache = TeacherCache(out)
    target = cache.batch(list(range(len(cache)))).flatten()
    return kd_loss(student_logits, target, kind=kind, temperature=tau)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl"])
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_full_vocab_cache_gives_the_online_loss(setup, kind, tau):
    _, _, teacher_logits, student_logits = setup
    online = kd_loss(student_logits, teacher_logits, kind=kind, temperature=tau)
    cached = _cached_loss(setup, V, "fp32", kind, tau)
    torch.testing.assert_close(cached, online, atol=1e-5, rtol=1e-5)


def test_bf16_full_vocab_cache_is_within_tolerance(setup):
    _, _, teacher_logits, student_logits = setup
    online = kd_loss(student_logits, teacher_logits)
    cached = _cached_loss(setup, V, "bf16")
    # bf16 keeps 8 mantissa bits: log-probs of size ~6 carry ~0.02 absolute error.
    assert (cached - online).abs().mean() / online.mean() < 0.01


def test_top_k_loss_approaches_the_full_loss_as_k_grows(setup):
    _, _, teacher_logits, student_logits = setup
    online = kd_loss(student_logits, teacher_logits).mean()
    errors = [(_cached_loss(setup, k, "fp32").mean() - online).abs().item() for k in (4, 64, V)]
    assert errors[2] < 1e-5 and errors[2] <= errors[1] <= errors[0] + 1e-6
