"""Corpus preparation: packing, split, memory-mapped rows, sources, and one-line errors for bad input."""

import json
import lzma
import typing

import numpy as np
import pytest
import torch

from teachers import DataError
from teachers.data import (
    BUNDLED_EVAL,
    BUNDLED_TRAIN,
    TokenDataset,
    bundled_corpus,
    prepare_corpus,
    read_text,
    separator_id,
)

DOC_A = "It is a truth universally acknowledged, that a single man must be in want of a wife.\n" * 12
DOC_B = "To be, or not to be, that is the question.\n" * 15


@pytest.fixture
def two_texts(tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt.xz"
    a.write_text(DOC_A)
    with lzma.open(b, "wt") as f:
        f.write(DOC_B)
    return [a, b]


def _stream(tok, *docs):
    ids = []
    for d in docs:
        ids += tok(d, add_special_tokens=False)["input_ids"] + [0]
    return ids


def test_prepare_packs_splits_and_memory_maps(two_texts, tiny_tokenizer, tmp_path, capsys):
    out = tmp_path / "prep"
    meta = prepare_corpus(two_texts, tiny_tokenizer, out, seq_len=16, val_fraction=0.2, seed=3)
    assert "2 documents" in capsys.readouterr().out
    assert json.loads((out / "meta.json").read_text()) == meta
    stream = _stream(tiny_tokenizer, DOC_A, DOC_B)
    n_rows = len(stream) // 16
    assert meta["dtype"] == "uint16" and meta["tokens"]["total"] == len(stream)
    assert meta["n_seqs"] == {"train": n_rows - round(n_rows * 0.2), "val": round(n_rows * 0.2)}
    assert meta["separator"] == "<|endoftext|>" and meta["documents"] == 2
    assert meta["bytes"] == len(DOC_A) + len(DOC_B)
    assert meta["bytes_per_token"] == pytest.approx(meta["bytes"] / (len(stream) - 2))
    train, val = TokenDataset(out), TokenDataset(out, "val")
    assert len(train) + len(val) == n_rows and train[0].dtype == torch.int64 and train[0].shape == (16,)
    rows = {tuple(train[i].tolist()) for i in range(len(train))} | {tuple(val[i].tolist()) for i in range(len(val))}
    expected = {tuple(stream[i * 16:(i + 1) * 16]) for i in range(n_rows)}
    assert rows == expected  # every packed row lands in exactly one split
    assert (out / "train.bin").stat().st_size == len(train) * 16 * 2
    assert train.bytes_per_token == meta["bytes_per_token"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_split_is_deterministic(two_texts, tiny_tokenizer, tmp_path):
    a = prepare_corpus(two_texts, tiny_tokenizer, tmp_path / "a", seq_len=16, val_fraction=0.2, seed=1)
    b = prepare_corpus(two_texts, tiny_tokenizer, tmp_path / "b", seq_len=16, val_fraction=0.2, seed=1)
    c = prepare_corpus(two_texts, tiny_tokenizer, tmp_path / "c", seq_len=16, val_fraction=0.2, seed=2)
    assert a["data_hash"] == b["data_hash"] != c["data_hash"]
    assert (tmp_path / "a" / "val.bin").read_bytes() == (tmp_path / "b" / "val.bin").read_bytes()


def test_rerun_replaces_the_output(two_texts, tiny_tokenizer, tmp_path):
    out = tmp_path / "prep"
    prepare_corpus(two_texts, tiny_tokenizer, out, seq_len=16)
    meta = prepare_corpus(two_texts[:1], tiny_tokenizer, out, seq_len=8, val_fraction=0.0)
    assert TokenDataset(out).meta == meta and len(TokenDataset(out, "val")) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt.xz", "prep"]


def test_jsonl_parquet_and_directory_sources(tiny_tokenizer, tmp_path):
    import pandas as pd

    src = tmp_path / "src"
    src.mkdir()
    with open(src / "docs.jsonl", "w") as f:
        f.writelines(json.dumps({"text": text, "id": 1}) + "\n" for text in (DOC_A, DOC_B, ""))
    pd.DataFrame({"body": [DOC_B, DOC_A]}).to_parquet(tmp_path / "docs.parquet")
    meta = prepare_corpus([src], tiny_tokenizer, tmp_path / "j", seq_len=16, val_fraction=0.0)
    assert meta["documents"] == 2 and meta["tokens"]["total"] == len(_stream(tiny_tokenizer, DOC_A, DOC_B))
    meta = prepare_corpus([tmp_path / "docs.parquet"], tiny_tokenizer, tmp_path / "p", seq_len=16,
                          text_field="body")
    assert meta["documents"] == 2 and meta["tokens"]["total"] == len(_stream(tiny_tokenizer, DOC_B, DOC_A))


def test_uint32_when_the_vocabulary_is_large(two_texts, tmp_path):
    class BigVocab:
        """A character tokenizer whose ids start above 65535, so tokens need uint32."""

        eos_token = "<eos>"
        special_tokens_map: typing.ClassVar[dict] = {"eos_token": "<eos>"}

        def get_vocab(self):
            return {"<eos>": 70_000, **{chr(c): 66_000 + c for c in range(128)}}

        def __len__(self):
            return 70_001

        def __call__(self, texts, add_special_tokens=False):
            return {"input_ids": [[66_000 + ord(ch) for ch in t] for t in texts]}

    meta = prepare_corpus(two_texts[:1], BigVocab(), tmp_path / "big", seq_len=32, val_fraction=0.0)
    assert meta["dtype"] == "uint32" and meta["separator_id"] == 70_000
    assert TokenDataset(tmp_path / "big")[0][0].item() == 66_000 + ord("I")


def test_max_tokens_caps_the_corpus(two_texts, tiny_tokenizer, tmp_path):
    meta = prepare_corpus(two_texts, tiny_tokenizer, tmp_path / "cap", seq_len=16, max_tokens=40,
                          val_fraction=0.0)
    assert meta["tokens"]["total"] == 40 and meta["n_seqs"]["train"] == 2


def test_bundled_corpus_is_shipped_and_readable():
    corpus = bundled_corpus()
    assert set(corpus) == set(BUNDLED_TRAIN) | set(BUNDLED_EVAL)
    assert all(p.is_file() and p.name.endswith(".txt.xz") for p in corpus.values())
    assert read_text(corpus["hamlet"]).lstrip().startswith(("HAMLET", "THE TRAGEDY", "Hamlet"))
    assert (corpus["hamlet"].parent / "PROVENANCE.md").is_file()


def test_bundled_source_names(tiny_tokenizer, tmp_path):
    meta = prepare_corpus("bundled:hamlet", tiny_tokenizer, tmp_path / "h", seq_len=64, max_tokens=5000)
    assert meta["sources"] == ["shakespeare_eval_hamlet.txt.xz"]
    with pytest.raises(DataError, match="unknown bundled text 'nope'"):
        prepare_corpus(["bundled:nope"], tiny_tokenizer, tmp_path / "x", seq_len=64)


def test_separator_choice(tiny_tokenizer):
    assert separator_id(tiny_tokenizer, None) == ("<|endoftext|>", 0)
    with pytest.raises(DataError, match="not a single token"):
        separator_id(tiny_tokenizer, "<|not-a-token|>")


def _bad(tmp_path, name, content: bytes):
    p = tmp_path / name
    p.write_bytes(content)
    return p


@pytest.mark.parametrize("name, content, needle", [
    ("empty.txt", b"  \n\n", "empty file"),
    ("binary.txt", b"abc\x00\x01\x02def" * 10, "binary content (NUL byte at offset 3)"),
    ("latin1.txt", "café crème ".encode("latin-1") * 10, "not UTF-8 (bad byte at offset 3)"),
    ("short.txt", b"too short", "fewer than one sequence of 64"),
    ("notext.jsonl", b'{"body": "hello there"}\n', "no field 'text' (fields: body); set data.text_field"),
    ("broken.xz", b"not xz data at all", "corrupt xz file"),
])
def test_bad_input_is_one_line_and_leaves_nothing(name, content, needle, tiny_tokenizer, tmp_path):
    src = _bad(tmp_path, name, content)
    out = tmp_path / "out"
    with pytest.raises(DataError) as exc:
        prepare_corpus([src], tiny_tokenizer, out, seq_len=64)
    msg = str(exc.value)
    assert needle in msg and name in msg and "\n" not in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == [name], "half-written output left behind"


def test_missing_file_and_missing_prepared_dir(tiny_tokenizer, tmp_path):
    with pytest.raises(DataError, match=r"missing\.txt: file not found"):
        prepare_corpus([tmp_path / "missing.txt"], tiny_tokenizer, tmp_path / "out", seq_len=8)
    with pytest.raises(DataError, match="run the prepare stage"):
        TokenDataset(tmp_path / "out")


def test_truncated_token_file_is_detected(two_texts, tiny_tokenizer, tmp_path):
    out = tmp_path / "prep"
    prepare_corpus(two_texts, tiny_tokenizer, out, seq_len=16)
    data = (out / "train.bin").read_bytes()
    (out / "train.bin").write_bytes(data[:-2])
    with pytest.raises(DataError, match="wrong size"):
        TokenDataset(out)
    assert np.fromfile(out / "val.bin", dtype=np.uint16).size % 16 == 0


def test_rows_start_with_the_tokenizers_own_prefix(two_texts, tiny_tokenizer, tmp_path):
    import copy

    from tokenizers.processors import TemplateProcessing

    gemma_like = copy.deepcopy(tiny_tokenizer)  # adds bos at the start of every sequence, as Gemma's does
    gemma_like.backend_tokenizer.post_processor = TemplateProcessing(
        single="<|endoftext|> $A", special_tokens=[("<|endoftext|>", 0)])
    assert gemma_like("ab")["input_ids"][0] == 0
    meta = prepare_corpus(two_texts, gemma_like, tmp_path / "g", seq_len=16, val_fraction=0.0)
    ds = TokenDataset(tmp_path / "g")
    stream = _stream(tiny_tokenizer, DOC_A, DOC_B)
    assert meta["row_prefix"] == [0] and len(ds) == len(stream) // 15
    assert ds[1].tolist() == [0, *stream[15:30]]
    plain = prepare_corpus(two_texts, tiny_tokenizer, tmp_path / "p", seq_len=16, val_fraction=0.0)
    forced = prepare_corpus(two_texts, tiny_tokenizer, tmp_path / "f", seq_len=16, val_fraction=0.0, bos=True)
    assert plain["row_prefix"] == [] and forced["row_prefix"] == [0]
    off = prepare_corpus(two_texts, gemma_like, tmp_path / "o", seq_len=16, val_fraction=0.0, bos=False)
    assert off["row_prefix"] == [] and off["data_hash"] == plain["data_hash"]


# --------------------------------------------------------------------- a derived student vocabulary
@pytest.fixture(scope="module")
def subset_vocab(tmp_path_factory, tiny_tokenizer):
    from teachers.vocab import VocabMap, student_tokenizer

    student = student_tokenizer(tiny_tokenizer, "subset:280", cache_dir=tmp_path_factory.mktemp("vocab"))
    return VocabMap.build(tiny_tokenizer, student, "subset:280")


def _expected_views(vocab, docs, seq_len, prefix=()):
    """(rows, views) of the packed rows, counted from each tokenizer's own encoding and the byte offsets of the
    token strings: the holder of a student token is the teacher token whose bytes end at or after its end."""
    from tests.test_vocab import _byte_ends

    teacher, student = [], []
    for doc in docs:
        teacher += vocab.teacher_tokenizer(doc, add_special_tokens=False)["input_ids"] + [0]
        student += vocab.student_tokenizer(doc, add_special_tokens=False)["input_ids"] + [0]
    holder = np.searchsorted(_byte_ends(vocab.teacher_tokenizer, teacher),
                             _byte_ends(vocab.student_tokenizer, student)).tolist()
    piece = [k - holder.index(h) for k, h in enumerate(holder)]
    lead, body = len(prefix), seq_len - len(prefix)
    rows, views = [], []
    for r in range(len(student) // body):
        span = range(r * body, (r + 1) * body)
        first, last = holder[span[0]], holder[span[-1]]
        context = teacher[first - 1] if first > 0 else 0
        rows.append([*prefix, *student[span[0]:span[-1] + 1]])
        views.append(([*prefix, context, *teacher[first:last + 1]],
                      [*range(lead), *(lead + 1 + holder[k] - first for k in span)],
                      [*[0] * lead, *(piece[k] for k in span)]))
    return rows, views


def _views(ds) -> list:
    return [tuple(x.tolist() for x in (ds.teacher_view(i).ids, ds.teacher_view(i).pos, ds.teacher_view(i).piece))
            for i in range(len(ds))]


def test_teacher_views_match_a_count_by_byte_offsets(two_texts, subset_vocab, tmp_path):
    student = subset_vocab.student_tokenizer
    meta = prepare_corpus(two_texts, student, tmp_path / "p", seq_len=16, val_fraction=0.0, vocab=subset_vocab)
    rows, views = _expected_views(subset_vocab, [DOC_A, DOC_B], 16)
    ds = TokenDataset(tmp_path / "p")
    assert [ds[i].tolist() for i in range(len(ds))] == rows and _views(ds) == views
    assert views[0][0][0] == 0  # the very first row's context is the separator
    t_tokens = len(subset_vocab.teacher_tokenizer(DOC_A + DOC_B, add_special_tokens=False)["input_ids"])
    s_tokens = len(student(DOC_A + DOC_B, add_special_tokens=False)["input_ids"])
    assert meta["vocab"] == ds.meta["vocab"] == "subset:280" and meta["vocab_size"] == 280
    assert meta["teacher_view"]["vocab_size"] == 320 and meta["teacher_text_tokens"] == t_tokens
    assert meta["tokens_per_teacher_token"] == pytest.approx(s_tokens / t_tokens)
    split = prepare_corpus(two_texts, student, tmp_path / "s", seq_len=16, val_fraction=0.3, seed=1, vocab=subset_vocab)
    both = [TokenDataset(tmp_path / "s", name) for name in ("train", "val")]
    pairs = {(tuple(ds[i].tolist()), str(_views(ds)[i])) for ds in both for i in range(len(ds))}
    assert split["n_seqs"]["val"] > 0 and pairs == {(tuple(r), str(v)) for r, v in zip(rows, views)}


def test_rows_led_by_bos_map_it_to_the_teachers_bos(tmp_path):
    """A teacher that puts <s> before every sequence: the view starts with its <s>, then the context token."""
    from eval.testing import BOS_TRAIN_TEXT, bos_tokenizer
    from teachers.vocab import VocabMap, student_tokenizer

    teacher = bos_tokenizer()
    vocab = VocabMap.build(teacher, student_tokenizer(teacher, "subset:270", cache_dir=tmp_path), "subset:270")
    docs = [BOS_TRAIN_TEXT * 3, DOC_B]
    for i, doc in enumerate(docs):
        (tmp_path / f"{i}.txt").write_text(doc)
    meta = prepare_corpus([tmp_path / "0.txt", tmp_path / "1.txt"], vocab.student_tokenizer, tmp_path / "p",
                          seq_len=16, val_fraction=0.0, vocab=vocab)
    assert meta["row_prefix"] == [1] and meta["teacher_view"]["row_prefix"] == [1]
    rows, views = _expected_views(vocab, docs, 16, prefix=(1,))
    ds = TokenDataset(tmp_path / "p")
    assert [ds[i].tolist() for i in range(len(ds))] == rows and _views(ds) == views


def test_a_teacher_vocabulary_dataset_has_no_teacher_view(two_texts, tiny_tokenizer, tmp_path):
    meta = prepare_corpus(two_texts, tiny_tokenizer, tmp_path / "p", seq_len=16)
    assert meta["vocab"] == "teacher" and meta["teacher_view"] is None and meta["format"] == 2
    with pytest.raises(DataError, match=r"p: prepared with student.vocab=teacher, whose rows are teacher tokens"):
        TokenDataset(tmp_path / "p").teacher_view(0)


def test_older_and_newer_data_formats(two_texts, tiny_tokenizer, tmp_path):
    prepare_corpus(two_texts, tiny_tokenizer, tmp_path / "p", seq_len=16)
    path = tmp_path / "p" / "meta.json"
    meta = json.loads(path.read_text())
    old = {k: v for k, v in meta.items() if k not in ("vocab", "teacher_view")} | {"format": 1}
    path.write_text(json.dumps(old))
    assert TokenDataset(tmp_path / "p").meta["vocab"] == "teacher"  # format 1 held the teacher's vocabulary only
    path.write_text(json.dumps(meta | {"format": 3}))
    with pytest.raises(DataError, match=r"meta.json: data format 3 is newer than this spikedistill reads \(2\)"):
        TokenDataset(tmp_path / "p")


def test_a_truncated_view_file_is_detected(two_texts, subset_vocab, tmp_path):
    prepare_corpus(two_texts, subset_vocab.student_tokenizer, tmp_path / "p", seq_len=16, vocab=subset_vocab)
    pos = tmp_path / "p" / "train.pos.bin"
    pos.write_bytes(pos.read_bytes()[:-2])
    with pytest.raises(DataError, match=r"train\.pos\.bin: missing or wrong size .* rerun the prepare stage"):
        TokenDataset(tmp_path / "p")


def test_a_document_the_teacher_cannot_spell_is_named_and_nothing_is_left(tmp_path):
    from teachers.vocab import VocabMap, student_tokenizer
    from tests.test_vocab import _teacher_without_rare_bytes

    teacher = _teacher_without_rare_bytes()
    vocab = VocabMap.build(teacher, student_tokenizer(teacher, "bytes", cache_dir=tmp_path / "cache"), "bytes")
    src = tmp_path / "odd.jsonl"
    src.write_text(json.dumps({"text": "It is a truth " * 20}) + "\n" + json.dumps({"text": "a truth\x04"}) + "\n")
    with pytest.raises(DataError) as exc:
        prepare_corpus([src], vocab.student_tokenizer, tmp_path / "out", seq_len=8, vocab=vocab)
    msg = str(exc.value)
    assert msg.startswith("odd.jsonl (document 2): character U+0004 at offset 7") and "\n" not in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "odd.jsonl"]
