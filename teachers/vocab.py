"""Student vocabularies derived from the teacher's byte-level BPE (recipe key `student.vocab`).

Spellings (parse_vocab):
  teacher    the teacher's own tokenizer (the default).
  subset:N   the teacher's BPE with its merge list cut to its first merges, so that the student's vocabulary
             has N entries in all: every added (special) token of the teacher, the 256 byte symbols of
             byte-level BPE, and the products of the teacher's first merges, in rank order.
  bytes      the added tokens and the 256 byte symbols alone, no merges (subset at its smallest N).

Why the boundaries nest: learned BPE merges in rank order, and a merge's parts are made by earlier merges, so
the student's tokens of a word are the teacher's BPE state after its first merges. Every teacher token is a
whole number of student tokens (its "pieces") and every teacher-token boundary is a student-token boundary
(Phan, Khisti & Ullrich, "Cross-Tokenizer Likelihood Scoring", ICLR 2026, arXiv 2512.14954, build their subset
vocabularies the same way). The nesting is checked on the data, not assumed: teachers.data compares the
teacher's tokens decomposed into pieces with the student tokenizer's own encoding of every document.

Student ids are 0..N-1 in the teacher's id order; bytes the teacher lacks (below) come last. Where the
teacher's ids run specials, base symbols, merge products in rank order (SmolLM2, the tiny test tokenizer),
student ids equal teacher ids; nothing relies on that: VocabMap holds both directions.

Bytes without a teacher symbol. Byte-level BPE spells text in 256 symbols, one per byte, but a trained
tokenizer only keeps the symbols its training text had. The bundled SmolLM2 tokenizer lacks 21 (`missing_bytes`):
0x04 0x06 0x13 0x14 0x16 0x1d (ASCII control characters: valid in UTF-8 text), 0xf1 0xf2 (lead bytes of code
points U+40000..U+BFFFF, planes 4-11: unassigned, yet valid UTF-8 that Python strings can hold), and 0xc0
0xc1 0xf5..0xff (bytes that never occur in UTF-8). The teacher's tokenizer drops such bytes without a word
(BPE without an unk token) and merges across the gap ("..\\x04.." gives one token "...."), so its tokens do
not spell such text. The student adds all missing bytes to its base alphabet, so every text encodes and
decodes back. They have no teacher token (teacher id -1): the teacher gives them zero mass, exact targets
never predict them, and the prepare stage refuses a training document holding one (teachers.data), since no
teacher token stream spells that text.

Supported teachers: fast tokenizers whose model is merge-based BPE over byte-level symbols (a ByteLevel
pre-tokenizer, alone or in a Sequence: GPT-2, SmolLM2, Llama-3, Qwen style). Refused with one line:
WordPiece, Unigram, WordLevel, slow-only tokenizers, BPE without byte-level symbols, and BPE with
byte_fallback (SentencePiece style: Gemma, Llama-2), whose base alphabet is characters, not bytes.

A derived tokenizer is built once per (teacher tokenizer hash, spelling) and cached as an ordinary
PreTrainedTokenizerFast folder (tokenizer.json, tokenizer_config.json, chat template) under
$SPIKEDISTILL_CACHE/vocab (default ~/.cache/spikedistill/vocab), written to a temp folder and renamed. It keeps
the teacher's pre-tokenizer, normalizer, decoder, post-processor (ids renumbered), bos/eos/pad/unk names and
chat template, so export, generation, bits/byte and lm-eval use it like any tokenizer.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from teachers.errors import TeacherError
from teachers.hashing import tokenizer_hash

KEY = "student.vocab"
SPELLINGS = "teacher | subset:N | bytes"
VERSION = 1  # bump when the construction changes, so cached tokenizers are rebuilt
_MARK = "spikedistill_vocab.json"
_SUPPORTED = "supported: byte-level BPE (GPT-2, SmolLM2, Llama-3, Qwen style)"


@dataclass(frozen=True)
class VocabSpec:
    """A parsed `student.vocab`: kind "teacher" | "subset" | "bytes"; size N for subset, else None."""

    kind: str
    size: int | None = None

    def __str__(self) -> str:
        return f"subset:{self.size}" if self.kind == "subset" else self.kind

    @property
    def is_teacher(self) -> bool:
        return self.kind == "teacher"


def parse_vocab(text: str | VocabSpec) -> VocabSpec:
    """The VocabSpec of a spelling `teacher`, `subset:N` (N a positive integer) or `bytes`.

    Raises TeacherError (one line naming student.vocab and the spellings). The size range of N depends on
    the teacher's tokenizer: see check_size."""
    if isinstance(text, VocabSpec):
        return text
    spelled = str(text).strip()
    if spelled in ("teacher", "bytes"):
        return VocabSpec(spelled)
    match = re.fullmatch(r"subset:(\d+)", spelled)
    if match and int(match.group(1)) > 0:
        return VocabSpec("subset", int(match.group(1)))
    hint = " (write the size as digits, e.g. subset:8192)" if spelled.startswith("subset") else ""
    raise TeacherError(f"{KEY}: must be {SPELLINGS}, got {text!r}{hint}")


def _teacher_json(tokenizer) -> dict:
    """The teacher's tokenizer.json as a dict, after checking it is byte-level BPE (TeacherError otherwise)."""
    name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise TeacherError(f"{KEY}: the teacher's tokenizer {name} has no fast (tokenizers) backend; {_SUPPORTED}; "
                           f"use {KEY}=teacher")
    spec = json.loads(backend.to_str())
    model = spec["model"]
    problem = None
    if model.get("type") != "BPE":
        problem = f"its model is {model.get('type')}, not merge-based BPE"
    elif model.get("byte_fallback"):
        problem = "it is BPE with byte_fallback (SentencePiece style, e.g. Gemma, Llama-2)"
    elif not _has_byte_level(spec.get("pre_tokenizer")):
        problem = "its BPE has no ByteLevel pre-tokenizer, so its base symbols are not bytes"
    elif model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        problem = "its BPE marks subwords (continuing_subword_prefix / end_of_word_suffix)"
    elif model.get("dropout"):
        problem = "its BPE has dropout (random tokenization)"
    if problem:
        raise TeacherError(f"{KEY}: the teacher's tokenizer {name} cannot be cut to a subset: {problem}; "
                           f"{_SUPPORTED}; use {KEY}=teacher")
    return spec


def _has_byte_level(pre_tokenizer: dict | None) -> bool:
    if not pre_tokenizer:
        return False
    if pre_tokenizer.get("type") == "Sequence":
        return any(_has_byte_level(p) for p in pre_tokenizer.get("pretokenizers", []))
    return pre_tokenizer.get("type") == "ByteLevel"


def byte_symbols() -> list[str]:
    """The 256 symbols byte-level BPE spells bytes with (GPT-2's table), in byte order 0x00..0xff."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return [table[b] for b in range(256)]


def _merges(model: dict) -> list[tuple[str, str]]:
    """The merge list as pairs (tokenizers writes [a, b] lists; older files "a b" strings)."""
    return [tuple(m.split(" ", 1)) if isinstance(m, str) else (m[0], m[1]) for m in model["merges"]]


def missing_bytes(teacher_tokenizer) -> list[int]:
    """The byte values (0..255) whose byte-level symbol is not in the teacher's vocabulary, ascending."""
    vocab = _teacher_json(teacher_tokenizer)["model"]["vocab"]
    return [b for b, symbol in enumerate(byte_symbols()) if symbol not in vocab]


def size_range(teacher_tokenizer) -> tuple[int, int]:
    """(smallest N, teacher's size): subset:N needs smallest <= N < teacher's size; smallest = added tokens +
    256 byte symbols (the size of `bytes`)."""
    return _size_range(_teacher_json(teacher_tokenizer), len(teacher_tokenizer))


def _size_range(teacher: dict, teacher_size: int) -> tuple[int, int]:
    return len({a["content"] for a in teacher["added_tokens"]} | set(byte_symbols())), teacher_size


def check_size(teacher_tokenizer, spec: str | VocabSpec) -> VocabSpec:
    """Parse `spec` and check it fits this teacher: its tokenizer is byte-level BPE (unless spec is teacher)
    and, for subset:N, smallest <= N < teacher's size (size_range). Raises TeacherError (one line)."""
    spec = parse_vocab(spec)
    if not spec.is_teacher:
        _check_size(_teacher_json(teacher_tokenizer), len(teacher_tokenizer), spec)
    return spec


def _check_size(teacher: dict, teacher_size: int, spec: VocabSpec) -> None:
    smallest, _ = _size_range(teacher, teacher_size)
    if spec.kind == "subset" and not smallest <= spec.size < teacher_size:
        raise TeacherError(f"{KEY}=subset:{spec.size}: N must be >= {smallest} (the teacher's added tokens and "
                           f"256 byte symbols; that size is {KEY}=bytes) and < {teacher_size} (the teacher's "
                           f"size; that is {KEY}=teacher)")


def _kept_merges(merges: list[tuple[str, str]], entries: dict[str, None], size: int | None):
    """The teacher's first merges, in rank order, until `entries` (updated in place) holds `size` symbols
    (None: no merges). A merge whose parts no earlier merge made means the list is not in learned order."""
    kept = []
    for rank, (left, right) in enumerate(merges):
        if size is None or len(entries) >= size:
            break
        if left not in entries or right not in entries:
            raise TeacherError(f"{KEY}: the teacher's merge {rank} ({left!r} + {right!r}) uses a token no earlier "
                               "merge makes: its merges are not in learned order, so no prefix of them nests; "
                               f"use {KEY}=teacher")
        kept.append([left, right])
        entries.setdefault(left + right)
    if size is not None and len(entries) < size:
        raise TeacherError(f"{KEY}=subset:{size}: the teacher's merges give only {len(entries)} entries; lower N")
    return kept


def _student_ids(spec: dict, entries: dict[str, None]) -> dict[str, int]:
    """Student id of every entry: the teacher's id order, then the bytes the teacher lacks (byte order)."""
    teacher_id = {**spec["model"]["vocab"], **{a["content"]: a["id"] for a in spec["added_tokens"]}}
    known = sorted((s for s in entries if s in teacher_id), key=teacher_id.__getitem__)
    extra = [s for s in byte_symbols() if s in entries and s not in teacher_id]
    return {s: i for i, s in enumerate(known + extra)}


def _remap_processor(node, new_id: dict[str, int]):
    """A post-processor (or truncation/padding) JSON with every special-token id renumbered by its content."""
    if isinstance(node, list):
        return [_remap_processor(x, new_id) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _remap_processor(v, new_id) for k, v in node.items()}
    if node.get("type") == "TemplateProcessing":
        out["special_tokens"] = {name: {**tok, "ids": [new_id[t] for t in tok["tokens"]]}
                                 for name, tok in node["special_tokens"].items()}
    for key in ("sep", "cls"):  # BertProcessing / RobertaProcessing: [token, id]
        if isinstance(node.get(key), list) and len(node[key]) == 2:
            out[key] = [node[key][0], new_id[node[key][0]]]
    if "pad_token" in node and "pad_id" in node and node["pad_token"] in new_id:
        out["pad_id"] = new_id[node["pad_token"]]
    return out


def student_json(teacher_tokenizer, spec: str | VocabSpec) -> dict:
    """The student's tokenizer.json (a dict) for spec subset:N or bytes: see the module docstring. Raises
    TeacherError (one line) for an unsupported teacher tokenizer or an N outside its range."""
    spec = parse_vocab(spec)
    if spec.is_teacher:
        raise TeacherError(f"{KEY}=teacher needs no derived tokenizer; use the teacher's own")
    teacher = _teacher_json(teacher_tokenizer)
    _check_size(teacher, len(teacher_tokenizer), spec)
    return _student_json(teacher, spec)


def _student_json(teacher: dict, spec: VocabSpec) -> dict:
    model = teacher["model"]
    entries = dict.fromkeys(a["content"] for a in teacher["added_tokens"])
    entries.update(dict.fromkeys(byte_symbols()))
    merges = _kept_merges(_merges(model), entries, spec.size)
    new_id = _student_ids(teacher, entries)
    added = {a["content"] for a in teacher["added_tokens"]}
    vocab = {s: i for s, i in new_id.items() if s not in added or s in model["vocab"]}
    student = dict(teacher)
    student["added_tokens"] = [{**a, "id": new_id[a["content"]]} for a in teacher["added_tokens"]]
    student["model"] = {**model, "vocab": vocab, "merges": merges,
                        "unk_token": model.get("unk_token") if model.get("unk_token") in vocab else None}
    for key in ("post_processor", "truncation", "padding"):
        student[key] = _remap_processor(teacher.get(key), new_id)
    return student


def _cache_dir(teacher_tokenizer, spec: VocabSpec, cache_dir) -> Path:
    from teachers.loading import cache_root

    key = f"{tokenizer_hash(teacher_tokenizer)}|{spec}|v{VERSION}"
    name = f"{str(spec).replace(':', '-')}-{hashlib.sha256(key.encode()).hexdigest()[:16]}"
    return cache_root(cache_dir) / "vocab" / name


def student_tokenizer(teacher_tokenizer, spec: str | VocabSpec, cache_dir: str | os.PathLike | None = None):
    """The student's tokenizer for `spec`: the teacher's own for `teacher`, else the derived one (built once,
    cached under $SPIKEDISTILL_CACHE/vocab keyed by the teacher tokenizer's hash and the spec; see the module
    docstring). Returns a transformers fast tokenizer. Raises TeacherError (one line) for a bad spec or an
    unsupported teacher tokenizer."""
    from transformers import AutoTokenizer

    spec = parse_vocab(spec)
    if spec.is_teacher:
        return teacher_tokenizer
    teacher = _teacher_json(teacher_tokenizer)
    _check_size(teacher, len(teacher_tokenizer), spec)
    dest = _cache_dir(teacher_tokenizer, spec, cache_dir)
    if not (dest / _MARK).is_file():
        _write_cached(teacher_tokenizer, _student_json(teacher, spec), spec, dest)
    return AutoTokenizer.from_pretrained(dest)


def _write_cached(teacher_tokenizer, body: dict, spec: VocabSpec, dest: Path) -> None:
    """Write the derived tokenizer folder (tokenizer.json = body) in a temp dir beside `dest`, rename it there."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        teacher_tokenizer.save_pretrained(tmp)
        for stale in ("vocab.json", "merges.txt", "added_tokens.json"):  # slow-tokenizer files of the teacher
            (tmp / stale).unlink(missing_ok=True)
        (tmp / "tokenizer.json").write_text(json.dumps(body, ensure_ascii=False), encoding="utf-8")
        _renumber_config(tmp / "tokenizer_config.json", body)
        (tmp / _MARK).write_text(json.dumps({"spec": str(spec), "version": VERSION, "size": _size(body),
                                             "teacher_tokenizer_hash": tokenizer_hash(teacher_tokenizer)}))
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            os.rename(tmp, dest)
        except OSError:  # another process finished first: keep its identical folder
            if not (dest / _MARK).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _size(body: dict) -> int:
    return len(set(body["model"]["vocab"]) | {a["content"] for a in body["added_tokens"]})


def _renumber_config(path: Path, body: dict) -> None:
    """tokenizer_config.json's added_tokens_decoder (id -> token, written by older transformers) renumbered."""
    if not path.is_file():
        return
    config = json.loads(path.read_text(encoding="utf-8"))
    if "added_tokens_decoder" in config:
        new_id = {a["content"]: a["id"] for a in body["added_tokens"]}
        config["added_tokens_decoder"] = {str(new_id[t["content"]]): t for t in config["added_tokens_decoder"].values()
                                          if t["content"] in new_id}
        path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")


@dataclass(frozen=True)
class VocabMap:
    """How a student vocabulary derived from the teacher's (student.vocab = subset:N | bytes) maps to it.

    pieces[t]: the student ids that spell teacher token t (its student tokenization), for every teacher id
        t in 0..teacher_size-1; computed by the student's BPE model on t's byte-level symbol string (not by
        pre-tokenizing text); an added (special) token is its own single piece; an id with no token: ().
    teacher_id: LongTensor [student_size], the teacher id of every student token; -1 for bytes the teacher
        lacks (see the module docstring: the teacher gives them zero mass).
    teacher_tokenizer, student_tokenizer: the two tokenizers; spec: the spelling ("subset:N" or "bytes").
    """

    spec: str
    pieces: tuple[tuple[int, ...], ...]
    teacher_id: torch.Tensor
    teacher_tokenizer: object
    student_tokenizer: object

    @property
    def teacher_size(self) -> int:
        return len(self.pieces)

    @property
    def student_size(self) -> int:
        return int(self.teacher_id.numel())

    @classmethod
    def build(cls, teacher_tokenizer, student_tokenizer, spec: str | VocabSpec) -> VocabMap:
        """The map between a teacher tokenizer and a student tokenizer derived from it by `spec`
        (student_tokenizer()). Raises TeacherError when a teacher token's pieces do not spell it (the student
        is not derived from this teacher)."""
        teacher = _teacher_json(teacher_tokenizer)
        model = student_tokenizer.backend_tokenizer.model
        student_added = {tok.content: sid for sid, tok in student_tokenizer.added_tokens_decoder.items()}
        by_id = {i: s for s, i in teacher["model"]["vocab"].items()}
        by_id.update({a["id"]: a["content"] for a in teacher["added_tokens"]})
        pieces = []
        for tid in range(len(teacher_tokenizer)):
            symbol = by_id.get(tid)
            pieces.append(() if symbol is None else _pieces(symbol, student_added, model, tid))
        return cls(str(spec), tuple(pieces), teacher_ids(teacher_tokenizer, student_tokenizer), teacher_tokenizer,
                   student_tokenizer)

    def piece_table(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids LongTensor [teacher_size, P] padded with -1, lengths LongTensor [teacher_size]); P = the most
        pieces of any teacher token."""
        lengths = torch.tensor([len(p) for p in self.pieces], dtype=torch.long)
        table = torch.full((len(self.pieces), int(lengths.max())), -1, dtype=torch.long)
        for tid, spelled in enumerate(self.pieces):
            table[tid, : len(spelled)] = torch.tensor(spelled, dtype=torch.long)
        return table, lengths

    def decompose(self, teacher_ids: Sequence[int]) -> list[int]:
        """The student ids of a teacher token sequence: the concatenation of the tokens' pieces."""
        return [s for t in teacher_ids for s in self.pieces[t]]


def teacher_ids(teacher_tokenizer, student_tokenizer) -> torch.Tensor:
    """LongTensor [len(student_tokenizer)]: the teacher id of every student token, found by its symbol string
    in the teacher's vocabulary; -1 for bytes the teacher lacks (see the module docstring)."""
    teacher = teacher_tokenizer.get_vocab()
    ids = torch.full((len(student_tokenizer),), -1, dtype=torch.long)
    for symbol, sid in student_tokenizer.get_vocab().items():
        ids[sid] = teacher.get(symbol, -1)
    return ids


def _pieces(symbol: str, student_added: dict[str, int], model, tid: int) -> tuple[int, ...]:
    if symbol in student_added:
        return (student_added[symbol],)
    spelled = model.tokenize(symbol)
    if "".join(tok.value for tok in spelled) != symbol:
        raise TeacherError(f"{KEY}: teacher token {tid} ({symbol!r}) has no spelling in the student's "
                           "vocabulary; the student tokenizer is not derived from this teacher's")
    return tuple(tok.id for tok in spelled)
