"""Student vocabularies derived from the teacher's byte-level BPE (teachers/vocab.py, recipe key student.vocab).

The derived tokenizer is built once and cached, keeps the teacher's settings, encodes every text, and its token
boundaries nest inside the teacher's: checked on the bundled corpus and on adversarial text by byte offsets
computed from the token strings alone (not from the pieces under test). Tokenizers that are not byte-level BPE
are refused in one line. One test uses the bundled SmolLM2 tokenizer (tokenizer only, no model).
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

import teachers.vocab as vocab_module
from teachers.data import bundled_corpus, encode_nested, read_text
from teachers.errors import DataError, TeacherError
from teachers.vocab import (
    VocabMap,
    VocabSpec,
    check_size,
    missing_bytes,
    parse_vocab,
    student_json,
    student_tokenizer,
)
from tests.conftest import _TRAIN_TEXT, EOT, build_tiny_tokenizer

ADVERSARIAL = {
    "digits": "0123456789" * 40 + " 3.14159 2,718,281 1e-9 007 ١٢٣",
    "whitespace": "a" + " " * 200 + "b  \n\n\n\n   \n" + "\n" * 80 + "c\r\n\r\nd \u00a0\u2003e",
    "tabs": "\tx\t\t\ty \t \t\n\t\t" + "\t" * 50,
    "non_ascii_emoji": "café naïve Zürich Ærøskøbing — “quotes” ∑∫√∞ 👍🏽 👨‍👩‍👧 🇫🇷 ÿ",
    "cjk": "日本語のテキスト、中文文本。한국어 텍스트" * 5,
    "special_token_text": f"{EOT} then <|im_start|>user\nhi<|im_end|> <|endoftext|",
    "long_word": "a" * 10_000,
    "long_mixed_word": "Supercalifragilistic" * 500,
    # invalid UTF-8 after decoding with errors="replace": U+FFFD, three valid bytes
    "invalid_utf8_replaced": b"ab\xff\xfe\xc0\xc1cd \xe2\x82 x \xed\xa0\x80".decode("utf-8", errors="replace"),
}


_LENGTHS: dict[int, np.ndarray] = {}


def _token_bytes(tokenizer) -> np.ndarray:
    """UTF-8 byte length of every token id, from the token strings alone: a byte-level symbol is one byte per
    character, an added token is its content's UTF-8 bytes."""
    if id(tokenizer) not in _LENGTHS:
        added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}
        _LENGTHS[id(tokenizer)] = np.array([len(added[i].encode("utf-8")) if i in added else
                                            len(tokenizer.convert_ids_to_tokens(i)) for i in range(len(tokenizer))])
    return _LENGTHS[id(tokenizer)]


def _byte_ends(tokenizer, ids) -> np.ndarray:
    """Cumulative UTF-8 byte ends of a token sequence (see _token_bytes)."""
    return np.cumsum(_token_bytes(tokenizer)[np.asarray(ids, dtype=np.int64)])


def assert_nests(vocab: VocabMap, text: str) -> None:
    """The teacher's token boundaries are student token boundaries, both cover the text's bytes, the holder of
    every student token spans it, and the student's tokens decode back to the text."""
    teacher, student, holder, piece = encode_nested(vocab, text)
    t_ends, s_ends = _byte_ends(vocab.teacher_tokenizer, teacher), _byte_ends(vocab.student_tokenizer, student)
    assert t_ends[-1] == s_ends[-1] == len(text.encode("utf-8"))
    assert np.isin(t_ends, s_ends).all(), "a teacher boundary inside a student token"
    starts = np.concatenate([[0], t_ends[:-1]])
    assert ((starts[holder] < s_ends) & (s_ends <= t_ends[holder])).all()
    first = np.concatenate([[True], holder[1:] != holder[:-1]])
    assert (piece[first] == 0).all() and (piece[1:][~first[1:]] == piece[:-1][~first[1:]] + 1).all()
    assert vocab.decompose(teacher.tolist()) == student.tolist()
    assert vocab.student_tokenizer.decode(student.tolist()) == text


def corpus_texts(chars: int) -> dict[str, str]:
    return {name: read_text(bundled_corpus()[name])[:chars] for name in ("austen", "shakespeare", "milton", "kjv")}


@pytest.fixture(scope="module")
def tiny():
    return build_tiny_tokenizer()


def _derived(teacher, spec, tmp_path):
    student = student_tokenizer(teacher, spec, cache_dir=tmp_path)
    return VocabMap.build(teacher, student, spec)


# ------------------------------------------------------------------------------------------- spelling
@pytest.mark.parametrize("text, spec", [("teacher", VocabSpec("teacher")), ("bytes", VocabSpec("bytes")),
                                        ("subset:8192", VocabSpec("subset", 8192)), (" subset:300 ", VocabSpec("subset", 300))])
def test_spellings_parse(text, spec):
    assert parse_vocab(text) == spec and str(parse_vocab(text)) == text.strip()


@pytest.mark.parametrize("text", ["subset", "subset:", "subset:0", "subset:-5", "subset:8k", "byte", "Teacher", ""])
def test_bad_spellings_are_one_line_naming_the_key_and_the_spellings(text):
    with pytest.raises(TeacherError) as exc:
        parse_vocab(text)
    msg = str(exc.value)
    assert msg.startswith("student.vocab: must be teacher | subset:N | bytes") and "\n" not in msg


def test_sizes_outside_the_teachers_range_are_refused(tiny):
    for n in (256, 320, 5000):
        with pytest.raises(TeacherError, match=r"^student\.vocab=subset:\d+: N must be >= 257 .* and < 320"):
            check_size(tiny, f"subset:{n}")
    assert check_size(tiny, "subset:257") == VocabSpec("subset", 257)


# ------------------------------------------------------------------------------- the derived tokenizer
@pytest.mark.parametrize("n", [257, 270, 300, 319])
def test_subset_is_the_teachers_first_n_tokens_in_its_own_ids(tiny, tmp_path, n):
    """The tiny teacher's ids run: <|endoftext|>, 256 bytes, merge products in rank order, so subset:N is
    exactly its first N tokens with the same ids, and its merges are the teacher's first N - 257."""
    student = student_tokenizer(tiny, f"subset:{n}", cache_dir=tmp_path)
    assert len(student) == n
    assert student.get_vocab() == {tok: i for tok, i in tiny.get_vocab().items() if i < n}
    merges = json.loads(student.backend_tokenizer.to_str())["model"]["merges"]
    assert merges == json.loads(tiny.backend_tokenizer.to_str())["model"]["merges"][: n - 257]


def test_bytes_is_the_alphabet_and_specials_and_nothing_else(tiny, tmp_path):
    student = student_tokenizer(tiny, "bytes", cache_dir=tmp_path)
    assert len(student) == 257 and not json.loads(student.backend_tokenizer.to_str())["model"]["merges"]
    ids = student.encode("the truth", add_special_tokens=False)
    assert len(ids) == len("the truth") and student.decode(ids) == "the truth"


def test_teacher_spec_is_the_teachers_own_tokenizer(tiny):
    assert student_tokenizer(tiny, "teacher") is tiny


def test_built_once_cached_atomically_and_deterministic(tiny, tmp_path, monkeypatch):
    first = student_tokenizer(tiny, "subset:300", cache_dir=tmp_path / "a")
    (folder,) = (tmp_path / "a" / "vocab").iterdir()
    assert folder.name.startswith("subset-300-")
    assert sorted(p.name for p in folder.iterdir()) == ["spikedistill_vocab.json", "tokenizer.json",
                                                        "tokenizer_config.json"]
    monkeypatch.setattr(vocab_module, "_write_cached", lambda *a: pytest.fail("built twice"))
    again = student_tokenizer(tiny, "subset:300", cache_dir=tmp_path / "a")
    assert again.get_vocab() == first.get_vocab()
    monkeypatch.undo()
    student_tokenizer(tiny, "subset:300", cache_dir=tmp_path / "b")
    (other,) = (tmp_path / "b" / "vocab").iterdir()
    assert (other / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    assert other.name == folder.name  # the key: teacher tokenizer hash + spec
    assert not [p for p in (tmp_path / "a" / "vocab").iterdir() if p.name.startswith(".")]


def test_the_teachers_settings_and_chat_template_are_kept(tiny, tmp_path):
    teacher = copy.deepcopy(tiny)
    teacher.chat_template = "{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    folder = tmp_path / "teacher"
    teacher.save_pretrained(folder)
    teacher = AutoTokenizer.from_pretrained(folder)
    student = student_tokenizer(teacher, "subset:280", cache_dir=tmp_path)
    assert isinstance(student, PreTrainedTokenizerFast)
    assert (student.bos_token, student.eos_token, student.pad_token) == (EOT, EOT, EOT)
    chat = [{"role": "user", "content": "Is it a truth?"}]
    text = teacher.apply_chat_template(chat, tokenize=False)
    assert student.apply_chat_template(chat, tokenize=False) == text
    ids = student.apply_chat_template(chat, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert student.decode(ids) == text


def _specials_last_teacher():
    """A Llama-3-like tiny teacher: its special tokens come after the merges and <s> starts every sequence."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(pattern=" ", behavior="merged_with_next"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator([_TRAIN_TEXT] * 4, trainer=trainer)
    tok.add_special_tokens(["<s>", EOT])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 300)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token=EOT, pad_token=EOT)


def test_specials_after_the_merges_are_renumbered_and_the_post_processor_follows(tmp_path):
    teacher = _specials_last_teacher()
    assert teacher.convert_tokens_to_ids(["<s>", EOT]) == [300, 301] and teacher.encode("x")[0] == 300
    vocab = _derived(teacher, "subset:280", tmp_path)
    student = vocab.student_tokenizer
    bos, eot = student.convert_tokens_to_ids(["<s>", EOT])
    assert len(student) == 280 and (bos, eot) == (278, 279)
    assert student.encode("x")[0] == bos and student.bos_token_id == bos and student.eos_token_id == eot
    assert vocab.teacher_id[[bos, eot]].tolist() == [300, 301] and vocab.pieces[300] == (bos,)
    for text in [*corpus_texts(20_000).values(), *ADVERSARIAL.values()]:
        assert_nests(vocab, text)


def test_a_teacher_that_ignores_merges_for_whole_words_still_nests(tiny, tmp_path):
    """Llama-3's BPE sets ignore_merges (a word that is a token is taken whole); the student inherits it."""
    spec = json.loads(tiny.backend_tokenizer.to_str())
    spec["model"]["ignore_merges"] = True
    teacher = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token=EOT)
    for n in (270, 300):
        vocab = _derived(teacher, f"subset:{n}", tmp_path)
        for text in [*corpus_texts(50_000).values(), *ADVERSARIAL.values()]:
            assert_nests(vocab, text)


# ------------------------------------------------------------------------------------------- nesting
@pytest.mark.parametrize("spec", ["subset:270", "subset:300", "bytes"])
def test_nesting_on_the_bundled_corpus_and_adversarial_text(tiny, tmp_path, spec):
    vocab = _derived(tiny, spec, tmp_path)
    for text in [*corpus_texts(100_000).values(), *ADVERSARIAL.values()]:
        assert_nests(vocab, text)


def test_merges_kept_out_of_order_break_the_nesting(tiny, tmp_path, monkeypatch):
    """The mutant: the first merges kept, but applied in reverse rank order. The nesting check catches it."""
    kept = vocab_module._kept_merges
    monkeypatch.setattr(vocab_module, "_kept_merges", lambda *a: kept(*a)[::-1])
    vocab = _derived(tiny, "subset:300", tmp_path)
    text = corpus_texts(20_000)["austen"]
    with pytest.raises(DataError, match="differ from the student's own tokens"):
        encode_nested(vocab, text)
    teacher = tiny(text, add_special_tokens=False)["input_ids"]
    student = vocab.student_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert not np.isin(_byte_ends(tiny, teacher), _byte_ends(vocab.student_tokenizer, student)).all()


def test_a_teacher_whose_merges_are_not_in_learned_order_is_refused(tiny):
    spec = json.loads(tiny.backend_tokenizer.to_str())
    merges = spec["model"]["merges"]
    user = next(i for i, (a, b) in enumerate(merges) if a in {x + y for x, y in merges[:i]})
    merges.insert(0, merges.pop(user))  # a merge of a token made by a later merge now comes first
    teacher = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token=EOT)
    with pytest.raises(TeacherError, match=r"^student\.vocab: the teacher's merge 0 .* not in learned order"):
        student_json(teacher, "subset:300")


# ------------------------------------------------------------------------------- bytes the teacher lacks
def _teacher_without_rare_bytes():
    """A tiny byte-level BPE trained without the full byte alphabet: it knows only the bytes of its text."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=120, special_tokens=[EOT], show_progress=False)
    tok.train_from_iterator([_TRAIN_TEXT] * 4, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT)


def test_bytes_the_teacher_lacks_are_added_and_every_text_encodes(tmp_path):
    teacher = _teacher_without_rare_bytes()
    lacking = sorted(set(range(256)) - set(_TRAIN_TEXT.encode("utf-8")))
    assert missing_bytes(teacher) == lacking
    assert teacher.decode(teacher.encode("a\x04b")) == "ab"  # the teacher drops what it has no symbol for
    vocab = _derived(teacher, "bytes", tmp_path)
    student = vocab.student_tokenizer
    assert len(student) == 257 and int((vocab.teacher_id < 0).sum()) == len(lacking)
    every_char = "".join(chr(c) for c in range(1, 0x800)) + chr(0xFFFD) + chr(0x40000) + chr(0x80000) + "😀"
    for text in [every_char, *ADVERSARIAL.values()]:
        assert student.decode(student.encode(text, add_special_tokens=False)) == text
    letter = next(chr(b) for b in lacking if chr(b).isalpha())
    with pytest.raises(DataError, match=rf"^doc 7: character U\+{ord(letter):04X} at offset 1 holds a byte the"):
        encode_nested(vocab, f"a{letter}e", "doc 7")
    plain = "It is a truth, that a man"
    assert_nests(vocab, plain)


def test_surrogates_are_not_text_for_either_tokenizer(tiny, tmp_path):
    """Bytes decoded with errors="surrogateescape" hold lone surrogates, which are not Unicode scalar values:
    `tokenizers` refuses them for the teacher and the student alike (and teachers.data refuses invalid UTF-8
    before any tokenizer sees it, with a DataError naming the file and byte offset)."""
    text = b"ab\xff\xfecd".decode("utf-8", errors="surrogateescape")
    student = student_tokenizer(tiny, "subset:300", cache_dir=tmp_path)
    for tok in (tiny, student):
        with pytest.raises(TypeError):
            tok.encode(text)


# ---------------------------------------------------------------------------------------- the map
def test_map_pieces_and_teacher_ids(tiny, tmp_path):
    vocab = _derived(tiny, "subset:280", tmp_path)
    student = vocab.student_tokenizer
    assert (vocab.teacher_size, vocab.student_size) == (320, 280)
    assert vocab.teacher_id.tolist() == list(range(280))  # the tiny teacher's order is kept
    assert vocab.pieces[0] == (0,)  # a special token is its own piece
    whole = 0
    for tid in range(1, 320):
        token = tiny.convert_ids_to_tokens(tid)
        assert "".join(student.convert_ids_to_tokens(list(vocab.pieces[tid]))) == token
        text = tiny.convert_tokens_to_string([token])
        if "\ufffd" not in text:  # independent: the student's own encoding of a token that is whole characters
            assert vocab.pieces[tid] == tuple(student.encode(text, add_special_tokens=False)), token
            whole += 1
    assert whole > 150
    table, lengths = vocab.piece_table()
    assert table.shape == (320, int(lengths.max()))
    assert all(table[t, : lengths[t]].tolist() == list(vocab.pieces[t]) for t in range(320))
    assert (table[lengths.unsqueeze(1) <= torch.arange(table.shape[1])] == -1).all()


def test_a_student_that_cannot_spell_a_teacher_token_is_refused(tiny, tmp_path):
    spec = json.loads(student_tokenizer(tiny, "bytes", cache_dir=tmp_path).backend_tokenizer.to_str())
    del spec["model"]["vocab"]["x"]
    student = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token=EOT)
    with pytest.raises(TeacherError, match=r"teacher token \d+ \('x'\) has no spelling in the student's"):
        VocabMap.build(tiny, student, "bytes")


# -------------------------------------------------------------------------------------- refusals
def _with_model(tiny, model) -> PreTrainedTokenizerFast:
    tok = Tokenizer.from_str(tiny.backend_tokenizer.to_str())
    tok.model = model
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOT)


def _refusals(tiny) -> dict:
    spec = json.loads(tiny.backend_tokenizer.to_str())
    fallback = copy.deepcopy(spec)
    fallback["model"]["byte_fallback"] = True
    dropout = copy.deepcopy(spec)
    dropout["model"]["dropout"] = 0.1
    whitespace = copy.deepcopy(spec)
    whitespace["pre_tokenizer"] = {"type": "Whitespace"}
    from_json = {name: PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(s)), eos_token=EOT)
                 for name, s in (("fallback", fallback), ("dropout", dropout), ("whitespace", whitespace))}
    from transformers import ByT5Tokenizer

    return {
        "wordpiece": (_with_model(tiny, models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]")), "WordPiece"),
        "unigram": (_with_model(tiny, models.Unigram([("<unk>", 0.0), ("a", -1.0)], 0)), "Unigram"),
        "wordlevel": (_with_model(tiny, models.WordLevel({"a": 0, "<unk>": 1}, unk_token="<unk>")), "WordLevel"),
        "byte_fallback": (from_json["fallback"], "byte_fallback (SentencePiece style"),
        "dropout": (from_json["dropout"], "dropout"),
        "not_byte_level": (from_json["whitespace"], "no ByteLevel pre-tokenizer"),
        "slow_only": (ByT5Tokenizer(), "no fast (tokenizers) backend"),
    }


@pytest.mark.parametrize("case", ["wordpiece", "unigram", "wordlevel", "byte_fallback", "dropout", "not_byte_level",
                                  "slow_only"])
def test_tokenizers_that_are_not_byte_level_bpe_are_refused_in_one_line(tiny, tmp_path, case):
    tokenizer, words = _refusals(tiny)[case]
    with pytest.raises(TeacherError) as exc:
        student_tokenizer(tokenizer, "subset:300", cache_dir=tmp_path)
    msg = str(exc.value)
    assert msg.startswith("student.vocab") and words in msg and "\n" not in msg
    assert "supported: byte-level BPE (GPT-2, SmolLM2, Llama-3, Qwen style)" in msg
    assert not (tmp_path / "vocab").exists()


# ------------------------------------------------------------------------------ the bundled teacher
@pytest.mark.slow
def test_the_bundled_smollm2_tokenizer(tmp_path):
    """SmolLM2's byte-level BPE (49,152 tokens: 17 added, 235 byte symbols, 48,900 merges): its 21 missing bytes,
    and nesting at subset:1024, subset:8192 and bytes on 100k characters of every bundled training text and on
    adversarial text."""
    from teachers.loading import load_tokenizer

    teacher = load_tokenizer("smollm2-135m")
    # control characters, lead bytes of planes 4-11, and bytes that never occur in UTF-8 (hand list)
    assert missing_bytes(teacher) == [0x04, 0x06, 0x13, 0x14, 0x16, 0x1D, 0xC0, 0xC1, 0xF1, 0xF2,
                                      *range(0xF5, 0x100)]
    texts = [*corpus_texts(100_000).values(), *ADVERSARIAL.values()]
    for spec, size in (("subset:1024", 1024), ("subset:8192", 8192), ("bytes", 17 + 256)):
        vocab = _derived(teacher, spec, tmp_path)
        student = vocab.student_tokenizer
        assert len(student) == size and student.chat_template == teacher.chat_template
        assert (student.bos_token, student.eos_token, student.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
        assert vocab.teacher_id[: size - 21].tolist() == list(range(size - 21))  # specials, bytes, merges kept
        for text in texts:
            assert_nests(vocab, text)
        for odd in ("a\x04b", "x" + chr(0x40000)):
            assert student.decode(student.encode(odd, add_special_tokens=False)) == odd
            with pytest.raises(DataError, match="holds a byte the teacher's tokenizer has no symbol for"):
                encode_nested(vocab, odd)
