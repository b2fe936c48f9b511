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


DOC_C = "Caf\u00e9 \u2014 na\u00efve \U0001f642 fa\u00e7ade; \u6f22\u5b57.\n" * 6  # 1-, 2-, 3- and 4-byte characters


def _prefix_of(text: str, limit: int) -> str:
    """The longest whole-character prefix of `text` within `limit` UTF-8 bytes, character by character."""
    out, used = [], 0
    for ch in text:
        size = len(ch.encode("utf-8"))
        if used + size > limit:
            break
        out.append(ch)
        used += size
    return "".join(out)


@pytest.mark.parametrize("into_c", [0, 4, 5, 7, 8, 9, 18, 19, 20, 21, 40])
def test_max_bytes_reads_whole_characters_up_to_the_cap(tmp_path, tiny_tokenizer, into_c):
    """The cap lands at the end of the first document (0) or inside the second: within é (its bytes 3-4),
    — (6-8) and the emoji (17-20), and just after each: the text read is the longest whole-character prefix
    within the cap, exactly the cap or up to 3 bytes short, tokenized as a whole and followed by the separator
    like any document."""
    a, c = tmp_path / "a.txt", tmp_path / "c.txt"
    a.write_text(DOC_A, encoding="utf-8")
    c.write_text(DOC_C, encoding="utf-8")
    cap = len(DOC_A.encode("utf-8")) + into_c
    meta = prepare_corpus([a, c], tiny_tokenizer, tmp_path / "out", seq_len=16, val_fraction=0.0, max_bytes=cap)
    prefix = _prefix_of(DOC_C, into_c)
    assert meta["bytes"] == len(DOC_A.encode("utf-8")) + len(prefix.encode("utf-8"))
    assert cap - 3 <= meta["bytes"] <= cap
    expected = _stream(tiny_tokenizer, DOC_A, *([prefix] if prefix else []))
    assert meta["tokens"]["total"] == len(expected) and meta["max_bytes"] == cap
    rows = TokenDataset(tmp_path / "out", "train")
    packed = torch.cat([rows[i] for i in range(len(rows))]).tolist()
    assert packed == expected[:len(packed)]
    assert meta["documents"] == (1 if into_c == 0 else 2)


def test_max_bytes_beyond_the_text_reads_it_all_and_one_cap_at_a_time(two_texts, tiny_tokenizer, tmp_path):
    whole = prepare_corpus(two_texts, tiny_tokenizer, tmp_path / "w", seq_len=16, val_fraction=0.0)
    capped = prepare_corpus(two_texts, tiny_tokenizer, tmp_path / "c", seq_len=16, val_fraction=0.0,
                            max_bytes=10**9)
    assert capped["data_hash"] == whole["data_hash"] and capped["bytes"] == whole["bytes"]
    with pytest.raises(DataError, match="both set; keep one of the two caps"):
        prepare_corpus(two_texts, tiny_tokenizer, tmp_path / "x", seq_len=16, max_tokens=40, max_bytes=400)


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
