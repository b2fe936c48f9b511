"""The hidden store (teacher_cache.store=hidden): the teacher's last hidden states and its LM head, from which
the loss recomputes the full-vocabulary logits. Contents against the online teacher, the key (no k, no
temperature), resume, corruption, refusals, and the KD it gives against online KD at every kind."""

import json

import pytest
import torch

from pipeline.losses import chunked_logit_losses, kd_loss
from teachers import CacheError, load_teacher
from teachers import cache as cache_mod
from teachers.cache import HiddenCache, TeacherCache, TeacherHead, build_teacher_cache, hidden_cache_key
from teachers.data import TokenDataset, prepare_corpus

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. To be, or not to be, that is the question.\n") * 3
SEQ = 16


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir, tmp_path_factory):
    return load_teacher(tiny_teacher_dir, cache_dir=tmp_path_factory.mktemp("hcache"))


@pytest.fixture(scope="module")
def prepared(teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("hprep")
    (root / "doc.txt").write_text(TEXT)
    prepare_corpus([root / "doc.txt"], teacher.tokenizer, root / "data", seq_len=SEQ, val_fraction=0.0)
    return root / "data"


def _build(teacher, prepared, out, **kw):
    kw = {"batch_size": 4, "shard_size": 4, "progress": False, "store": "hidden", **kw}
    return build_teacher_cache(teacher, prepared, out, **kw)


def test_hidden_store_gives_back_the_teachers_logits(teacher, prepared, tmp_path):
    stats = _build(teacher, prepared, tmp_path / "c", value_dtype="fp32")
    ds = TokenDataset(prepared)
    cache = HiddenCache(tmp_path / "c", expect=hidden_cache_key(teacher, prepared, "train", "fp32"))
    assert len(cache) == len(ds) and stats["shards"] == -(-len(ds) // 4)
    for row in (0, len(ds) - 1):
        online = teacher(ds[row][None]).logits[0]
        got = cache[row]
        assert got.hidden.shape == (SEQ, teacher.hidden_size) and got.hidden.dtype == torch.float32
        torch.testing.assert_close(got.head(got.hidden), online, rtol=1e-5, atol=1e-5)
    mode = (tmp_path / "c" / "manifest.json").stat().st_mode & 0o777
    assert {(tmp_path / "c" / n).stat().st_mode & 0o777 for n in ("head.safetensors", "shard_00000.safetensors")} \
        == {mode}  # as the manifest: readable by the others sharing a teacher_cache.dir when the umask allows
    key = json.loads((tmp_path / "c" / "manifest.json").read_text())["key"]
    assert "k" not in key and "temperature" not in key and key["format"] == cache_mod.HIDDEN_FORMAT
    batch = cache.batch([0, 1])
    assert batch.hidden.shape == (2, SEQ, teacher.hidden_size) and batch.head is cache.head


def test_bf16_hidden_store_size_and_rounding(teacher, prepared, tmp_path):
    stats = _build(teacher, prepared, tmp_path / "c", value_dtype="bf16", shard_size=64)
    ds = TokenDataset(prepared)
    got = HiddenCache(tmp_path / "c")[0]
    online = teacher(ds[0][None]).logits[0]
    assert got.hidden.dtype == torch.bfloat16
    torch.testing.assert_close(got.head(got.hidden), online, atol=0.05, rtol=0.02)
    head_bytes = (tmp_path / "c" / "head.safetensors").stat().st_size
    assert stats["head_bytes"] == head_bytes >= 4 * teacher.vocab_size * teacher.hidden_size  # fp32, any dtype
    assert 0 < stats["bytes"] - stats["tokens"] * teacher.hidden_size * 2 < 1024  # the shards: one header each
    assert stats["bytes_per_token"] == stats["bytes"] / stats["tokens"]


def test_one_hidden_store_serves_every_temperature_and_kind(teacher, prepared, tmp_path):
    """The store's loss is the online loss (fp32 hidden: to rounding) at tau 1, 2, 4 and for forward KL, reverse
    KL and JSD, where a top-k cache of the same size cannot be (it is keyed by tau and forward KL only)."""
    _build(teacher, prepared, tmp_path / "c", value_dtype="fp32")
    cache = HiddenCache(tmp_path / "c")
    ds = TokenDataset(prepared)
    rows = list(range(len(ds)))
    batch = cache.batch(rows)
    flat = batch.hidden.reshape(-1, batch.hidden.shape[-1])
    online = teacher(torch.stack([ds[r] for r in rows])).logits.reshape(-1, teacher.vocab_size)
    student = torch.randn(online.shape, generator=torch.Generator().manual_seed(0)) * 2
    labels = online.argmax(-1)
    for tau in (1.0, 2.0, 4.0):
        for kind in ("forward_kl", "reverse_kl", "jsd"):
            want = kd_loss(student, online, kind, tau).sum()
            got = chunked_logit_losses(student, lambda x: x, labels, lambda r: batch.head(flat[r]), kind, tau, 7)
            torch.testing.assert_close(got["kd_sum"], want, rtol=1e-5, atol=1e-5)


def test_killed_hidden_build_resumes(teacher, prepared, tmp_path, monkeypatch):
    out = tmp_path / "c"
    real_write, calls = cache_mod._write_shard, []

    def dies_on_second(out_dir, i, tensors, first_row):
        calls.append(i)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real_write(out_dir, i, tensors, first_row)

    monkeypatch.setattr(cache_mod, "_write_shard", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        _build(teacher, prepared, out)
    assert (out / "head.safetensors").is_file()  # the head is written before any shard
    with pytest.raises(CacheError, match="incomplete"):
        HiddenCache(out)
    monkeypatch.setattr(cache_mod, "_write_shard", real_write)
    stats = _build(teacher, prepared, out)
    assert stats["shards_written"] == stats["shards"] - 1
    full = _build(teacher, prepared, tmp_path / "full")
    assert full["shards_written"] == full["shards"]
    resumed, fresh = HiddenCache(out), HiddenCache(tmp_path / "full")
    assert all(torch.equal(resumed[r].hidden, fresh[r].hidden) for r in range(len(fresh)))


def test_a_head_that_does_not_match_the_key_is_refused(teacher, prepared, tmp_path):
    from safetensors.torch import save_file

    out = tmp_path / "c"
    _build(teacher, prepared, out)
    head = cache_mod._teacher_head(teacher)
    save_file({"weight": head.weight + 1.0}, str(out / "head.safetensors"))
    with pytest.raises(CacheError, match="head_sha256") as exc:
        HiddenCache(out)
    assert "\n" not in str(exc.value)
    (out / "head.safetensors").unlink()
    with pytest.raises(CacheError, match="head.safetensors.*--stages teacher_cache --force"):
        HiddenCache(out)
    _build(teacher, prepared, out)  # a rebuild with the same key rewrites the head, and the cache reads again
    assert HiddenCache(out)[0].hidden.shape == (SEQ, teacher.hidden_size)
    data = (out / "head.safetensors").read_bytes()
    (out / "head.safetensors").write_bytes(data[: len(data) // 3])  # truncated: unreadable, not just wrong
    stats = _build(teacher, prepared, out)
    assert stats["shards_written"] == 0  # the shards are kept, only the head is rewritten
    torch.testing.assert_close(HiddenCache(out).head.weight, head.weight)


def test_stores_are_not_read_for_one_another(teacher, prepared, tmp_path):
    _build(teacher, prepared, tmp_path / "h")
    build_teacher_cache(teacher, prepared, tmp_path / "t", k=8, progress=False)
    # a store that differs is named as such, with the key to set: deleting a shared cache is not the fix
    with pytest.raises(CacheError, match="store=hidden, this run asks for store=topk; set teacher_cache.store=hidden"):
        TeacherCache(tmp_path / "h")
    with pytest.raises(CacheError, match="store=topk, this run asks for store=hidden; .*another teacher_cache.dir"):
        HiddenCache(tmp_path / "t")
    with pytest.raises(CacheError, match="store=topk, this run asks for store=hidden") as exc:
        _build(teacher, prepared, tmp_path / "t")  # a hidden build never writes into a top-k cache
    assert "\n" not in str(exc.value)
    with pytest.raises(CacheError, match="teacher_cache.store='sparse'"):
        _build(teacher, prepared, tmp_path / "x", store="sparse")


def test_a_derived_student_vocabulary_is_refused(teacher, tmp_path):
    from teachers.vocab import VocabMap, student_tokenizer

    vocab = VocabMap.build(teacher.tokenizer, student_tokenizer(teacher.tokenizer, "bytes", cache_dir=tmp_path),
                           "bytes")
    (tmp_path / "doc.txt").write_text(TEXT)
    prepare_corpus([tmp_path / "doc.txt"], vocab.student_tokenizer, tmp_path / "data", seq_len=48,
                   val_fraction=0.0, vocab=vocab)
    with pytest.raises(CacheError, match="store=hidden needs student.vocab=teacher") as exc:
        _build(teacher, tmp_path / "data", tmp_path / "c", vocab=vocab)
    assert "\n" not in str(exc.value)


def test_teacher_head_applies_bias_and_softcap():
    torch.manual_seed(0)
    w, b, h = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64), torch.randn(4, 3)
    z = h.double() @ w.t() + b
    want = torch.tanh(z / 2.5) * 2.5  # Gemma 2's final logit soft-capping, written out
    torch.testing.assert_close(TeacherHead(w, b, 2.5)(h), want.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(TeacherHead(w)(h), (h.double() @ w.t()).float(), rtol=1e-6, atol=1e-6)
