"""Teacher caches: the top-k logit cache (contents, manifest key, resume after a kill, corruption detection)
and the hidden store (teacher_cache.store=hidden), which shares its machinery."""

import json
import math

import pytest
import torch

from pipeline.losses import chunked_logit_losses, kd_loss
from teachers import CacheError, load_teacher
from teachers import cache as cache_mod
from teachers.cache import (
    HiddenCache,
    SparseTargets,
    TeacherCache,
    TeacherHead,
    build_teacher_cache,
    cache_key,
    hidden_cache_key,
    nominal_bytes_per_token,
    topk_targets,
)
from teachers.data import TokenDataset, prepare_corpus

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
        "must be in want of a wife. To be, or not to be, that is the question.\n") * 3
SEQ = 16


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir, tmp_path_factory):
    return load_teacher(tiny_teacher_dir, cache_dir=tmp_path_factory.mktemp("tcache"))


@pytest.fixture(scope="module")
def prepared(teacher, tmp_path_factory):
    root = tmp_path_factory.mktemp("prep")
    (root / "doc.txt").write_text(TEXT)
    prepare_corpus([root / "doc.txt"], teacher.tokenizer, root / "data", seq_len=SEQ, val_fraction=0.0)
    return root / "data"


def _build(teacher, prepared, out, **kw):
    kw = {"k": 8, "batch_size": 4, "shard_size": 4, "progress": False, **kw}
    return build_teacher_cache(teacher, prepared, out, **kw)


def test_cache_holds_the_online_top_k(teacher, prepared, tmp_path):
    stats = _build(teacher, prepared, tmp_path / "c", value_dtype="fp32")
    ds = TokenDataset(prepared)
    cache = TeacherCache(tmp_path / "c", expect=cache_key(teacher, prepared, "train", 8, "fp32"))
    assert len(cache) == len(ds) and stats["shards"] == -(-len(ds) // 4) and cache.k == 8
    for row in (0, len(ds) - 1):
        online = topk_targets(teacher(ds[row][None]).logits[0], 8)
        got = cache[row]
        assert got.ids.dtype == torch.int64 and got.ids.shape == (SEQ, 8) and got.tail_mass.shape == (SEQ,)
        assert torch.equal(got.ids, online.ids)
        torch.testing.assert_close(got.logprobs, online.logprobs)
        torch.testing.assert_close(got.tail_mass, 1 - got.logprobs.exp().sum(-1), atol=1e-6, rtol=0)
    assert (got.logprobs[:, :-1] >= got.logprobs[:, 1:]).all()  # most probable first
    assert cache.bytes_per_token == pytest.approx(nominal_bytes_per_token(8, "fp32"), rel=0.5)
    batch = cache.batch([0, 1])
    assert batch.ids.shape == (2, SEQ, 8) and batch.flatten().ids.shape == (2 * SEQ, 8)


def test_bf16_values_and_bytes_per_token(teacher, prepared, tmp_path):
    stats = _build(teacher, prepared, tmp_path / "c", value_dtype="bf16", shard_size=64)
    exact = TeacherCache(tmp_path / "c")[0]
    online = topk_targets(teacher(TokenDataset(prepared)[0][None]).logits[0], 8)
    torch.testing.assert_close(exact.logprobs, online.logprobs, atol=0.02, rtol=0.01)
    header_bytes = stats["bytes"] - stats["tokens"] * nominal_bytes_per_token(8, "bf16")
    assert 0 < header_bytes < 1024  # one small safetensors header per shard


def test_key_mismatch_is_refused(teacher, prepared, tmp_path):
    _build(teacher, prepared, tmp_path / "c")
    with pytest.raises(CacheError, match=r"k=8 \(expected 16\)") as exc:
        _build(teacher, prepared, tmp_path / "c", k=16)
    assert "\n" not in str(exc.value)
    key = cache_key(teacher, prepared, "train", 8, "bf16")
    with pytest.raises(CacheError, match="teacher_fingerprint"):
        TeacherCache(tmp_path / "c", expect={**key, "teacher_fingerprint": "0" * 64})
    assert TeacherCache(tmp_path / "c", expect=key).k == 8
    stats = _build(teacher, prepared, tmp_path / "c", k=16, overwrite=True)
    assert TeacherCache(tmp_path / "c").k == 16 and stats["shards_written"] == stats["shards"]


def test_killed_build_resumes_at_the_first_missing_shard(teacher, prepared, tmp_path, monkeypatch):
    out = tmp_path / "c"
    real_write, calls = cache_mod._write_shard, []

    def dies_on_third(out_dir, i, tensors, first_row):
        calls.append(i)
        if len(calls) == 3:
            (out_dir / f".shard_{i:05d}.safetensors.tmp-1").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        real_write(out_dir, i, tensors, first_row)

    monkeypatch.setattr(cache_mod, "_write_shard", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        _build(teacher, prepared, out)
    with pytest.raises(CacheError, match="incomplete"):
        TeacherCache(out)
    monkeypatch.setattr(cache_mod, "_write_shard", real_write)
    stats = _build(teacher, prepared, out)
    assert stats["shards_written"] == stats["shards"] - 2
    assert not list(out.glob(".shard_*"))
    fresh = _build(teacher, prepared, tmp_path / "fresh")
    resumed, full = TeacherCache(out), TeacherCache(tmp_path / "fresh")
    for row in range(len(full)):
        assert torch.equal(resumed[row].ids, full[row].ids)
    assert fresh["shards_written"] == fresh["shards"]


def test_shuffled_reads_verify_each_shard_once(teacher, prepared, tmp_path, monkeypatch):
    from teachers import cache as cache_mod

    _build(teacher, prepared, tmp_path / "c")
    cache = TeacherCache(tmp_path / "c")
    checked = []
    verify = cache._verify
    monkeypatch.setattr(cache, "_verify", lambda path, *a: (checked.append(path.name), verify(path, *a)))
    monkeypatch.setattr(cache_mod, "OPEN_SHARDS", 2)  # fewer handles than shards: some are reopened
    order = torch.randperm(len(cache), generator=torch.Generator().manual_seed(0)).tolist() * 2
    rows = {r: cache[r] for r in order}
    n_shards = -(-len(cache) // 4)
    assert n_shards > 2 and sorted(checked) == sorted(set(checked)) and len(checked) == n_shards
    assert len(cache._open) == 2
    fresh = TeacherCache(tmp_path / "c")
    assert all(torch.equal(rows[r].ids, fresh[r].ids) for r in range(len(cache)))


def test_corrupt_shards_are_detected(teacher, prepared, tmp_path):
    out = tmp_path / "c"
    _build(teacher, prepared, out)
    shard = out / "shard_00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="checksum"):
        TeacherCache(out)[0]
    shard.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(CacheError, match="shard_00000.safetensors"):
        TeacherCache(out)[0]
    assert TeacherCache(out)[4].ids.shape == (SEQ, 8)  # other shards still read


def test_bad_arguments(teacher, prepared, tmp_path):
    with pytest.raises(CacheError, match="value_dtype"):
        _build(teacher, prepared, tmp_path / "c", value_dtype="int8")
    with pytest.raises(CacheError, match=r"k=321"):
        _build(teacher, prepared, tmp_path / "c", k=321)
    with pytest.raises(CacheError, match="run the prepare stage"):
        _build(teacher, tmp_path / "nothing", tmp_path / "c")
    with pytest.raises(CacheError, match="not found"):
        TeacherCache(tmp_path / "nowhere")


def test_dataset_from_another_tokenizer_is_refused(teacher, prepared, tmp_path):
    meta = json.loads((prepared / "meta.json").read_text())
    other = tmp_path / "other"
    other.mkdir()
    for name in ("train.bin", "val.bin"):
        (other / name).write_bytes((prepared / name).read_bytes())
    (other / "meta.json").write_text(json.dumps({**meta, "tokenizer_hash": "f" * 64}))
    with pytest.raises(CacheError, match="different tokenizer"):
        _build(teacher, other, tmp_path / "c")


def test_sparse_targets_stack_and_tail():
    logits = torch.randn(2, 3, 10)
    t = topk_targets(logits, 10)
    assert t.tail_mass.abs().max() < 1e-6
    parts = [topk_targets(logits[i], 4) for i in range(2)]
    both = SparseTargets.stack(parts)
    assert both.ids.shape == (2, 3, 4) and both.tail_mass.shape == (2, 3)
    torch.testing.assert_close(both.tail_mass, 1 - torch.softmax(logits, -1).topk(4, -1).values.sum(-1))


@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0, 4.0])
def test_topk_targets_are_those_of_the_tempered_teacher(tau):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 40, generator=gen) * 4
    q = torch.softmax(logits.double() / tau, -1)  # the truth: float64 probabilities of the tempered teacher
    top = q.topk(6, -1)
    got = topk_targets(logits, 6, tau)
    assert torch.equal(got.ids, top.indices)
    torch.testing.assert_close(got.logprobs.double(), top.values.log(), rtol=0, atol=2e-6)
    torch.testing.assert_close(got.tail_mass.double(), q.sum(-1) - top.values.sum(-1), rtol=1e-5, atol=1e-7)
    # log-probabilities at temperature 1 are the same rows shifted: the same targets
    again = topk_targets(torch.log_softmax(logits, -1), 6, tau)
    assert torch.equal(again.ids, got.ids)
    torch.testing.assert_close(again.logprobs, got.logprobs, rtol=0, atol=2e-6)


def test_topk_targets_tail_is_a_direct_sum():
    # a tail of ~1e-12: 1 - sum(top-k) would cancel to 0 or to float rounding (~1e-7)
    logits = torch.tensor([[30.0, 29.0, 0.0, 0.0, 0.0]])
    got = topk_targets(logits, 2, 1.0)
    want = 3 * math.exp(-30) / (1 + math.exp(-1) + 3 * math.exp(-30))
    assert got.tail_mass.item() == pytest.approx(want, rel=1e-5, abs=0)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(CacheError, match="distill.kd.temperature"):
            topk_targets(logits, 2, bad)


def test_cache_is_keyed_by_temperature(teacher, prepared, tmp_path):
    out = tmp_path / "c"
    _build(teacher, prepared, out, value_dtype="fp32", temperature=2.0)
    cache = TeacherCache(out, expect=cache_key(teacher, prepared, "train", 8, "fp32", temperature=2.0))
    assert cache.temperature == 2.0
    row = TokenDataset(prepared)[0]
    online = topk_targets(teacher(row[None]).logits[0], 8, 2.0)
    assert torch.equal(cache[0].ids, online.ids)
    torch.testing.assert_close(cache[0].logprobs, online.logprobs)
    torch.testing.assert_close(cache[0].tail_mass, online.tail_mass)
    with pytest.raises(CacheError, match=r"temperature=2.0 \(expected 1.0\)") as exc:
        TeacherCache(out, expect=cache_key(teacher, prepared, "train", 8, "fp32", temperature=1.0))
    assert "\n" not in str(exc.value)
    with pytest.raises(CacheError, match=r"temperature=2.0 \(expected 1.0\)") as exc:
        _build(teacher, prepared, out, value_dtype="fp32", temperature=1.0)
    assert "\n" not in str(exc.value)


def test_a_cache_of_the_previous_format_is_refused(teacher, prepared, tmp_path):
    out = tmp_path / "c"
    _build(teacher, prepared, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["key"]["format"] = 1  # format 1: temperature-1 targets, no temperature in the key
    del manifest["key"]["temperature"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    for attempt in (lambda: TeacherCache(out), lambda: _build(teacher, prepared, out)):
        with pytest.raises(CacheError, match="format 1.*rebuild") as exc:
            attempt()
        assert "\n" not in str(exc.value) and str(out) in str(exc.value)
    stats = _build(teacher, prepared, out, overwrite=True)
    assert stats["shards_written"] == stats["shards"] and TeacherCache(out).temperature == 1.0


@pytest.fixture(scope="module")
def bytes_prepared(teacher, tmp_path_factory):
    """TEXT prepared with the tiny teacher's bytes vocabulary: (dataset dir, VocabMap)."""
    from teachers.vocab import VocabMap, student_tokenizer

    root = tmp_path_factory.mktemp("bytes")
    vocab = VocabMap.build(teacher.tokenizer, student_tokenizer(teacher.tokenizer, "bytes", cache_dir=root), "bytes")
    (root / "doc.txt").write_text(TEXT)
    prepare_corpus([root / "doc.txt"], vocab.student_tokenizer, root / "data", seq_len=48, val_fraction=0.0,
                   vocab=vocab)
    return root / "data", vocab


def test_a_branch_floor_has_its_own_key_and_moves_targets_within_it(teacher, bytes_prepared, tmp_path):
    """Over a derived vocabulary the floor is part of the targets marker: a cache of one floor is refused for
    another, both ways. With k = the whole student vocabulary (temperature 1) the stored targets are the
    floored distributions, so two floors' caches differ by at most the largest skipped relative ending mass (below
    the floor) in total variation."""
    data, vocab = bytes_prepared
    size = vocab.student_size
    stats = {floor: _build(teacher, data, tmp_path / str(floor), k=size, value_dtype="fp32", vocab=vocab,
                           branch_floor=floor) for floor in (0.0, 0.3)}
    exact, skipped = (stats[f]["branches"] for f in (0.0, 0.3))
    assert exact["evaluated"] == exact["needed"] == skipped["needed"] > skipped["evaluated"] > 0
    assert exact["positions"] == stats[0.0]["tokens"] and 0 < skipped["max_skipped"] < 0.3
    keys = {f: cache_key(teacher, data, "train", size, "fp32", branch_floor=f) for f in (0.0, 0.3)}
    assert keys[0.0]["targets"] == cache_mod.SUBVOCAB_TARGETS
    assert keys[0.3]["targets"] == f"{cache_mod.SUBVOCAB_TARGETS} branch_floor=0.3"
    for have, want in ((0.0, 0.3), (0.3, 0.0)):
        with pytest.raises(CacheError, match="targets=") as exc:
            TeacherCache(tmp_path / str(have), expect=keys[want])
        assert "\n" not in str(exc.value)
    caches = {f: TeacherCache(tmp_path / str(f), expect=keys[f]) for f in (0.0, 0.3)}
    for row in range(len(caches[0.0])):
        dense = [torch.zeros(48, size).scatter(-1, c[row].ids, c[row].logprobs.exp()) for c in caches.values()]
        assert float(((dense[0] - dense[1]).abs().sum(-1) / 2).max()) <= skipped["max_skipped"] + 1e-6
    with pytest.raises(CacheError, match="teacher_cache.branch_floor"):
        _build(teacher, data, tmp_path / "bad", k=size, vocab=vocab, branch_floor=1.0)


def test_the_branch_floor_is_ignored_for_the_teachers_own_vocabulary(teacher, prepared, tmp_path):
    stats = _build(teacher, prepared, tmp_path / "c", branch_floor=0.5)
    assert "branches" not in stats
    assert TeacherCache(tmp_path / "c", expect=cache_key(teacher, prepared, "train", 8, "bf16")).k == 8


# ---------------------------------------------------------------------------- the hidden store
# The hidden store (teacher_cache.store=hidden): the teacher's last hidden states and its LM head, from which
# the loss recomputes the full-vocabulary logits. Contents against the online teacher, the key (no k, no
# temperature), resume, corruption, refusals, and the KD it gives against online KD at every kind.


def _build_hidden(teacher, prepared, out, **kw):
    return _build(teacher, prepared, out, **{"store": "hidden", **kw})  # k is unused by the hidden store


def test_hidden_store_gives_back_the_teachers_logits(teacher, prepared, tmp_path):
    stats = _build_hidden(teacher, prepared, tmp_path / "c", value_dtype="fp32")
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
    stats = _build_hidden(teacher, prepared, tmp_path / "c", value_dtype="bf16", shard_size=64)
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
    _build_hidden(teacher, prepared, tmp_path / "c", value_dtype="fp32")
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
        _build_hidden(teacher, prepared, out)
    assert (out / "head.safetensors").is_file()  # the head is written before any shard
    with pytest.raises(CacheError, match="incomplete"):
        HiddenCache(out)
    monkeypatch.setattr(cache_mod, "_write_shard", real_write)
    stats = _build_hidden(teacher, prepared, out)
    assert stats["shards_written"] == stats["shards"] - 1
    full = _build_hidden(teacher, prepared, tmp_path / "full")
    assert full["shards_written"] == full["shards"]
    resumed, fresh = HiddenCache(out), HiddenCache(tmp_path / "full")
    assert all(torch.equal(resumed[r].hidden, fresh[r].hidden) for r in range(len(fresh)))


def test_a_head_that_does_not_match_the_key_is_refused(teacher, prepared, tmp_path):
    from safetensors.torch import save_file

    out = tmp_path / "c"
    _build_hidden(teacher, prepared, out)
    head = cache_mod._teacher_head(teacher)
    save_file({"weight": head.weight + 1.0}, str(out / "head.safetensors"))
    with pytest.raises(CacheError, match="head_sha256") as exc:
        HiddenCache(out)
    assert "\n" not in str(exc.value)
    (out / "head.safetensors").unlink()
    with pytest.raises(CacheError, match="head.safetensors.*--stages teacher_cache --force"):
        HiddenCache(out)
    _build_hidden(teacher, prepared, out)  # a rebuild with the same key rewrites the head, and the cache reads again
    assert HiddenCache(out)[0].hidden.shape == (SEQ, teacher.hidden_size)
    data = (out / "head.safetensors").read_bytes()
    (out / "head.safetensors").write_bytes(data[: len(data) // 3])  # truncated: unreadable, not just wrong
    stats = _build_hidden(teacher, prepared, out)
    assert stats["shards_written"] == 0  # the shards are kept, only the head is rewritten
    torch.testing.assert_close(HiddenCache(out).head.weight, head.weight)


def test_stores_are_not_read_for_one_another(teacher, prepared, tmp_path):
    _build_hidden(teacher, prepared, tmp_path / "h")
    build_teacher_cache(teacher, prepared, tmp_path / "t", k=8, progress=False)
    # a store that differs is named as such, with the key to set: deleting a shared cache is not the fix
    with pytest.raises(CacheError, match="store=hidden, this run asks for store=topk; set teacher_cache.store=hidden"):
        TeacherCache(tmp_path / "h")
    with pytest.raises(CacheError, match="store=topk, this run asks for store=hidden; .*another teacher_cache.dir"):
        HiddenCache(tmp_path / "t")
    with pytest.raises(CacheError, match="store=topk, this run asks for store=hidden") as exc:
        _build_hidden(teacher, prepared, tmp_path / "t")  # a hidden build never writes into a top-k cache
    assert "\n" not in str(exc.value)
    with pytest.raises(CacheError, match="teacher_cache.store='sparse'"):
        _build_hidden(teacher, prepared, tmp_path / "x", store="sparse")


def test_a_derived_student_vocabulary_is_refused(teacher, tmp_path):
    from teachers.vocab import VocabMap, student_tokenizer

    vocab = VocabMap.build(teacher.tokenizer, student_tokenizer(teacher.tokenizer, "bytes", cache_dir=tmp_path),
                           "bytes")
    (tmp_path / "doc.txt").write_text(TEXT)
    prepare_corpus([tmp_path / "doc.txt"], vocab.student_tokenizer, tmp_path / "data", seq_len=48,
                   val_fraction=0.0, vocab=vocab)
    with pytest.raises(CacheError, match="store=hidden needs student.vocab=teacher") as exc:
        _build_hidden(teacher, tmp_path / "data", tmp_path / "c", vocab=vocab)
    assert "\n" not in str(exc.value)


def test_teacher_head_applies_bias_and_softcap():
    torch.manual_seed(0)
    w, b, h = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, dtype=torch.float64), torch.randn(4, 3)
    z = h.double() @ w.t() + b
    want = torch.tanh(z / 2.5) * 2.5  # Gemma 2's final logit soft-capping, written out
    torch.testing.assert_close(TeacherHead(w, b, 2.5)(h), want.float(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(TeacherHead(w)(h), (h.double() @ w.t()).float(), rtol=1e-6, atol=1e-6)
