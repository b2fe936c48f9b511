"""Corpus preparation: read sources, tokenize with the student's tokenizer, pack, split, memory-map.

The student's tokenizer is the teacher's own, or one derived from it (teachers.vocab: student.vocab =
subset:N | bytes); with a derived one the teacher's view of every row is stored too (see TeacherView).

Sources (list of strings or paths):
  "bundled"              all four bundled training texts (austen, shakespeare, milton, kjv)
  "bundled:NAME"         one bundled text by name (see bundled_corpus())
  a .txt / .txt.xz file  one document (any other suffix is read as plain text too)
  a .jsonl / .json file  one document per record, read from `text_field` (through `datasets`)
  a .parquet / .arrow    one document per row, read from `text_field` (through `datasets`)
  a save_to_disk folder  a `datasets` Dataset saved with `save_to_disk` (state.json + *.arrow): one document
                         per row of `text_field`; a saved DatasetDict gives its "train" split
  a directory            every file above at its top level, sorted by name (subfolders are not read;
                         metadata files such as dataset_info.json, config.json, tokenizer.json are skipped)
  a glob pattern         "data/train-*.parquet": every match, sorted
  anything else          a Hub dataset name (split "train", through `datasets`; needs network)

A model directory or the prepare stage's own output named as a source is an error saying what it is.
`check_sources` runs these checks (and peeks at the first record of .jsonl / .parquet / saved datasets for
`text_field`) without tokenizing anything, so a recipe can be checked before any work.

Text policy: files must be UTF-8. Bytes that are not (or NUL bytes, i.e. binary content) are an error naming
the file and the byte offset, never silently replaced: convert the file first (e.g. `iconv -f latin1 -t utf-8`).

Output directory: train.bin and val.bin (row-major [n_seqs, seq_len], uint16 when the vocabulary fits, else
uint32) and meta.json. It is written in a temp directory renamed into place, so an interrupted run leaves
nothing that looks finished.

With a derived student vocabulary (meta.json "vocab" is not "teacher") each split also has the teacher's view
of its rows (read with TokenDataset.teacher_view; dtypes in meta.json "teacher_view"):
  <split>.teacher.bin          the rows' teacher token windows, concatenated (uint16 or uint32)
  <split>.teacher_offsets.bin  int64 [n_seqs + 1]: row i's window is teacher.bin[offsets[i]:offsets[i + 1]]
  <split>.pos.bin              [n_seqs, seq_len]: per student position, the index in its row's window of the
                               teacher token holding it (uint16, or uint32 for rows beyond 65,533 tokens)
  <split>.piece.bin            [n_seqs, seq_len] uint16: the index of the student token among that teacher
                               token's pieces (teachers.vocab.VocabMap.pieces)
Format 2 added "vocab" and the teacher views; a format-1 directory is read as student.vocab=teacher.
"""

from __future__ import annotations

import difflib
import glob
import hashlib
import json
import lzma
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from teachers.errors import DataError
from teachers.hashing import tokenizer_hash
from teachers.vocab import VocabMap

CORPUS_DIR = Path(__file__).parent / "corpus"
_BUNDLED_FILES = {
    "austen": "austen_train.txt.xz",
    "shakespeare": "shakespeare_train.txt.xz",
    "milton": "milton.txt.xz",
    "kjv": "kjv.txt.xz",
    "persuasion": "austen_eval_persuasion.txt.xz",
    "hamlet": "shakespeare_eval_hamlet.txt.xz",
}
BUNDLED_TRAIN = ("austen", "shakespeare", "milton", "kjv")
BUNDLED_EVAL = ("persuasion", "hamlet")
_TEXT_SUFFIXES = (".txt", ".txt.xz", ".xz")
_TABLE_SUFFIXES = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".arrow": "arrow"}
# JSON files that describe a folder (datasets, models, our own run folders) rather than hold documents
_METADATA_FILES = frozenset({
    "dataset_info.json", "state.json", "dataset_dict.json", "config.json", "generation_config.json",
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "vocab.json",
    "meta.json", "manifest.json", "done.json", "stage.json", "results.json", "trainer_state.json",
    "model.safetensors.index.json", "adapter_config.json", "preprocessor_config.json",
})
_KINDS = ".txt, .txt.xz, .jsonl, .json, .parquet, .arrow"
_FORMAT_VERSION = 2


def bundled_corpus() -> dict[str, Path]:
    """{name: path} of the bundled public-domain texts (.txt.xz package data, see corpus/PROVENANCE.md).

    Training texts: BUNDLED_TRAIN = austen, shakespeare, milton, kjv. Held out for evaluation:
    BUNDLED_EVAL = persuasion (Austen), hamlet (Shakespeare).
    """
    return {name: CORPUS_DIR / fname for name, fname in _BUNDLED_FILES.items()}


def read_text(path: str | os.PathLike) -> str:
    """The UTF-8 text of a .txt or .txt.xz file; DataError if missing, empty, binary or not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: file not found; check the path in data.sources")
    try:
        if path.suffix == ".xz":
            with lzma.open(path) as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except lzma.LZMAError as exc:
        raise DataError(f"{path}: corrupt xz file ({exc}); re-create it with `xz -k`") from exc
    return _decode(raw, path)


def _decode(raw: bytes, path: Path) -> str:
    nul = raw.find(b"\x00")
    if nul >= 0:
        raise DataError(f"{path}: binary content (NUL byte at offset {nul}); give a UTF-8 text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 (bad byte at offset {exc.start}); convert it first, e.g. "
                        "`iconv -f latin1 -t utf-8`") from exc
    if not text.strip():
        raise DataError(f"{path}: empty file; remove it from data.sources")
    return text


@dataclass(frozen=True)
class SavedDataset:
    """A folder written by `datasets.Dataset.save_to_disk` (state.json, dataset_info.json, *.arrow)."""

    path: Path


def _is_saved_dataset(path: Path) -> bool:
    return (path / "state.json").is_file() and (path / "dataset_info.json").is_file()


def _foreign_folder(path: Path) -> str | None:
    """What a folder is when it is not a folder of documents (a model, a prepared dataset), else None."""
    if (path / "meta.json").is_file() and (path / "train.bin").is_file():
        return ("the prepare stage's packed token rows, not source text; name the text files it was made "
                "from")
    if (path / "config.json").is_file() and (any(path.glob("*.safetensors")) or any(path.glob("tokenizer*"))):
        return ("a model directory (config.json, weights/tokenizer), not text; a teacher goes in teacher.spec, "
                "data.sources takes text, JSONL, Parquet or a save_to_disk folder")
    if (path / "config.yaml").is_file() and (path / "prepare").is_dir():
        return "a spikedistill run directory, not text; name the text files in data.sources"
    return None


def _saved_dataset_dict(path: Path) -> list[SavedDataset]:
    """The "train" split of a folder written by `datasets.DatasetDict.save_to_disk`."""
    try:
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits", [])
    except (OSError, ValueError, AttributeError):
        splits = sorted(p.name for p in path.iterdir() if p.is_dir() and _is_saved_dataset(p))
    if "train" not in splits or not _is_saved_dataset(path / "train"):
        raise DataError(f"{path}: a saved DatasetDict without a 'train' split (splits: {', '.join(splits) or 'none'}); "
                        f"name one split's folder in data.sources, e.g. {path / (splits[0] if splits else 'SPLIT')}")
    return [SavedDataset(path / "train")]


def _expand_dir(path: Path) -> list[str | Path | SavedDataset]:
    if _is_saved_dataset(path):
        return [SavedDataset(path)]
    if (path / "dataset_dict.json").is_file():
        return _saved_dataset_dict(path)
    foreign = _foreign_folder(path)
    if foreign:
        raise DataError(f"{path}: {foreign}")
    entries = sorted(p for p in path.iterdir() if not p.name.startswith("."))
    files = [p for p in entries if p.is_file() and _suffix(p) is not None and p.name not in _METADATA_FILES]
    if not files:
        others = [p.name + ("/" if p.is_dir() else "") for p in entries][:6]
        found = f"found: {', '.join(others)}" if others else "it is empty"
        raise DataError(f"{path}: directory holds no {_KINDS} files at its top level ({found}; subfolders are "
                        "not read); name the files or subfolders in data.sources")
    return files


def _expand(source: str | os.PathLike) -> list[str | Path | SavedDataset]:
    """One source string -> the files, saved datasets (or Hub name) it stands for."""
    s = str(source)
    corpus = bundled_corpus()
    if s == "bundled":
        return [corpus[name] for name in BUNDLED_TRAIN]
    if s.startswith("bundled:"):
        name = s.split(":", 1)[1]
        if name not in corpus:
            close = difflib.get_close_matches(name, list(corpus), n=1)
            hint = f" did you mean bundled:{close[0]}?" if close else ""
            raise DataError(f"data.sources: unknown bundled text {name!r};{hint} choose one of {sorted(corpus)}")
        return [corpus[name]]
    path = Path(s).expanduser()
    if path.is_dir():
        return _expand_dir(path)
    if glob.has_magic(s) and not path.exists():
        matches = sorted(Path(m) for m in glob.glob(str(path)))
        if not matches:
            raise DataError(f"{s}: the pattern matches no file; check it in data.sources")
        return [item for m in matches for item in (_expand_dir(m) if m.is_dir() else [m])]
    if path.exists() or _suffix(path) is not None or s.startswith(("/", ".", "~")):
        return [path]
    return [s]


def check_sources(sources: list[str | os.PathLike], text_field: str = "text") -> None:
    """Check data.sources without reading whole files: every local path exists and is something we read,
    and .jsonl / .parquet / .arrow files and saved datasets have `text_field` in their first record.
    Hub names are not checked (that needs the network). Raises DataError naming the file and the fix."""
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if not sources:
        raise DataError("data.sources is empty; name at least one file, directory, 'bundled' or Hub dataset")
    for source in sources:
        for item in _expand(source):
            if isinstance(item, SavedDataset):
                _check_field(item.path, _saved_fields(item.path), text_field)
            elif isinstance(item, Path):
                if not item.is_file():
                    raise DataError(f"{item}: file not found; check the path in data.sources")
                fields = _first_record_fields(item)
                if fields is not None:
                    _check_field(item, fields, text_field)


def _check_field(where: Path, fields: list[str], text_field: str) -> None:
    if text_field not in fields:
        close = difflib.get_close_matches(text_field, fields, n=1)
        hint = f" did you mean data.text_field={close[0]}?" if close else " set data.text_field"
        raise DataError(f"{where}: no field {text_field!r} (fields: {', '.join(fields)});{hint}")


def _saved_fields(path: Path) -> list[str]:
    try:
        info = json.loads((path / "dataset_info.json").read_text(encoding="utf-8"))
        return list(info.get("features") or {})
    except (OSError, ValueError, AttributeError) as exc:
        raise DataError(f"{path}/dataset_info.json: unreadable ({type(exc).__name__}); save the dataset "
                        "again with save_to_disk") from exc


def _first_record_fields(path: Path) -> list[str] | None:
    """Field names of the first record of a .jsonl / .parquet / .arrow file (None: not such a file)."""
    suffix = _suffix(path)
    if suffix == ".jsonl":
        with open(path, "rb") as fh:
            for number, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        record = json.loads(line)
                    except ValueError:
                        raise DataError(f"{path}: line {number} is not JSON; give one JSON object per line") from None
                    if not isinstance(record, dict):
                        raise DataError(f"{path}: line {number} is not a JSON object; give one object per line, "
                                        'e.g. {"text": "..."}')
                    return list(record)
        return None  # empty: reading it says so
    if suffix in (".parquet", ".arrow"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            if suffix == ".parquet":
                return list(pq.read_schema(path).names)
            with pa.memory_map(str(path)) as mm:
                return list(pa.ipc.open_stream(mm).schema.names)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(f"{path}: not a readable {suffix[1:]} file ({type(exc).__name__}); check the "
                            "file") from exc
    return None


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    for suffix in (*_TEXT_SUFFIXES, *_TABLE_SUFFIXES):
        if name.endswith(suffix):
            return suffix
    return None


def _documents(source: str | Path | SavedDataset, text_field: str, tmp: Path) -> Iterator[str]:
    """Yield the documents of one expanded source."""
    if isinstance(source, SavedDataset):
        yield from _saved_documents(source.path, text_field)
        return
    if isinstance(source, str):
        yield from _hub_documents(source, text_field, tmp)
        return
    suffix = _suffix(source)
    if not source.is_file():
        raise DataError(f"{source}: file not found; check the path in data.sources")
    if suffix in _TABLE_SUFFIXES:
        yield from _table_documents(source, _TABLE_SUFFIXES[suffix], text_field, tmp)
    else:
        yield read_text(source)


def _saved_documents(path: Path, text_field: str) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises several types for a damaged folder
        raise DataError(f"{path}: cannot be read as a save_to_disk dataset ({type(exc).__name__}); save it "
                        "again with Dataset.save_to_disk") from exc
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"{path}: a DatasetDict without a 'train' split (splits: {', '.join(ds)}); name "
                            "one split's folder in data.sources")
        ds = ds["train"]
    _check_field(path, list(ds.column_names), text_field)
    yield from _nonempty(ds[text_field], path)


def _table_documents(path: Path, builder: str, text_field: str, tmp: Path) -> Iterator[str]:
    import datasets

    if path.stat().st_size == 0:
        raise DataError(f"{path}: empty file; remove it from data.sources")
    try:
        ds = datasets.load_dataset(builder, data_files=str(path), split="train", cache_dir=str(tmp / "hf"))
    except Exception as exc:  # datasets wraps parse/encoding errors in several types
        raise DataError(f"{path}: cannot be read as {builder} ({type(exc).__name__}); check it is valid "
                        f"UTF-8 {builder} with one record per line/row") from exc
    _check_field(path, list(ds.column_names), text_field)
    yield from _nonempty(ds[text_field], path)


def _hub_documents(name: str, text_field: str, tmp: Path) -> Iterator[str]:
    import datasets

    try:
        ds = datasets.load_dataset(name, split="train", streaming=True)
        first = next(iter(ds))
    except Exception as exc:  # offline, unknown name, gated
        raise DataError(f"{name}: not a local file, and loading it as a Hub dataset failed "
                        f"({type(exc).__name__}); check the path or dataset name") from exc
    if text_field not in first:
        raise DataError(f"{name}: no field {text_field!r} (fields: {', '.join(first)}); set data.text_field")
    yield from _nonempty((row[text_field] for row in ds), name)


def _nonempty(texts, where) -> Iterator[str]:
    count = 0
    for text in texts:
        if isinstance(text, str) and text.strip():
            count += 1
            yield text
    if count == 0:
        raise DataError(f"{where}: no non-empty documents; check the file or data.text_field")


def separator_id(tokenizer, separator: str | None) -> tuple[str, int]:
    """The document separator token and its id: `separator`, else "<|endoftext|>" when the vocabulary has
    it (the plain-text separator of GPT-2 style and SmolLM2 tokenizers), else the eos token."""
    vocab = tokenizer.get_vocab()
    if separator is None:
        separator = "<|endoftext|>" if "<|endoftext|>" in vocab else tokenizer.eos_token
        if separator is None:
            raise DataError("data.separator: the tokenizer has no eos token; set data.separator to a token")
    if separator not in vocab:
        raise DataError(f"data.separator={separator!r} is not a single token of this tokenizer; "
                        "use a special token such as its eos token")
    return separator, vocab[separator]


def _encode(tokenizer, text: str) -> list[int]:
    """Token ids of one document; long texts are cut at line ends into ~64 KB pieces so the fast
    tokenizer can batch them (tokens differ from whole-text encoding only at those few line breaks)."""
    pieces, start, step = [], 0, 1 << 16
    while start < len(text):
        end = text.find("\n", start + step)
        end = len(text) if end < 0 else end + 1
        pieces.append(text[start:end])
        start = end
    ids: list[int] = []
    for enc in tokenizer(pieces, add_special_tokens=False)["input_ids"]:
        ids.extend(enc)
    return ids


class _Pieces:
    """A VocabMap's pieces as flat arrays, to cut teacher token streams into student tokens with numpy."""

    def __init__(self, vocab: VocabMap):
        self.length = np.array([len(p) for p in vocab.pieces], dtype=np.int64)
        self.start = np.concatenate([[0], np.cumsum(self.length)[:-1]])
        self.flat = np.array([s for p in vocab.pieces for s in p], dtype=np.int64)

    def cut(self, teacher_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """teacher ids [T] -> (student ids [S], holder [S]: index into teacher_ids, piece [S])."""
        lengths = self.length[teacher_ids]
        holder = np.repeat(np.arange(len(teacher_ids)), lengths)
        piece = np.arange(int(lengths.sum())) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        return self.flat[self.start[teacher_ids][holder] + piece], holder, piece


def encode_nested(vocab: VocabMap, text: str, where: str = "text", pieces: _Pieces | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Both tokenizations of `text`, checked to nest: (teacher ids [T], student ids [S], holder [S], piece [S]).

    Each tokenizer encodes the text (as prepare_corpus does, _encode); holder[s] is the index in the teacher
    ids of the teacher token holding student token s, piece[s] its index among that token's pieces
    (VocabMap.pieces). Raises DataError naming `where` unless the teacher's tokens cut into their pieces are
    exactly the student's own tokens (so every teacher-token boundary is a student-token boundary).
    """
    teacher = np.asarray(_encode(vocab.teacher_tokenizer, text), dtype=np.int64)
    student = np.asarray(_encode(vocab.student_tokenizer, text), dtype=np.int64)
    cut, holder, piece = (pieces or _Pieces(vocab)).cut(teacher)
    if not np.array_equal(cut, student):
        raise DataError(_nesting_problem(vocab, text, cut, student, where))
    return teacher, student, holder, piece


def _nesting_problem(vocab: VocabMap, text: str, cut: np.ndarray, student: np.ndarray, where: str) -> str:
    """Why a text's teacher tokens do not cut into its student tokens: a byte without a teacher symbol, or
    the first student token where they differ."""
    from teachers.vocab import byte_symbols

    symbols = vocab.student_tokenizer.convert_ids_to_tokens((vocab.teacher_id < 0).nonzero().flatten().tolist())
    lacking = {byte_symbols().index(s) for s in symbols}
    for offset, char in enumerate(text):
        if lacking.intersection(char.encode("utf-8")):
            return (f"{where}: character U+{ord(char):04X} at offset {offset} holds a byte the teacher's tokenizer "
                    "has no symbol for (it drops it), so no teacher token stream spells this text; remove such "
                    "characters or use student.vocab=teacher")
    n = min(len(cut), len(student))
    first = next((i for i in range(n) if cut[i] != student[i]), n)
    near = len(vocab.student_tokenizer.decode(student[:first].tolist()))
    return (f"{where}: the teacher's tokens cut into student pieces differ from the student's own tokens at "
            f"token {first} (near character {near}: {text[near:near + 24]!r}); the student vocabulary does not nest "
            "in the teacher's here; use student.vocab=teacher")


class _Corpus:
    """The packed corpus as it is read: the student's token stream, each document followed by the separator,
    and with a derived vocabulary the teacher's stream and, per student token, its holder and piece."""

    def __init__(self, tokenizer, sep_id: int, vocab: VocabMap | None):
        self.tokenizer, self.sep_id, self.vocab = tokenizer, sep_id, vocab
        self.pieces = _Pieces(vocab) if vocab is not None else None
        self.parts: dict[str, list[np.ndarray]] = {"student": [], "teacher": [], "holder": [], "piece": []}
        self.stats = {"documents": 0, "bytes": 0, "text_tokens": 0}
        if vocab is not None:
            self.stats["teacher_text_tokens"] = 0
        self.total = self.teacher_total = 0

    def add(self, doc: str, where: str) -> None:
        """Append one document and its separator."""
        if self.vocab is None:
            ids = np.asarray(_encode(self.tokenizer, doc), dtype=np.uint32)
        else:
            teacher, ids, holder, piece = encode_nested(self.vocab, doc, where, self.pieces)
            self.parts["teacher"].append(np.append(teacher, self.vocab.teacher_id[self.sep_id].item()))
            self.parts["holder"].append(np.append(holder, len(teacher)) + self.teacher_total)
            self.parts["piece"].append(np.append(piece, 0))
            self.teacher_total += len(teacher) + 1
            self.stats["teacher_text_tokens"] += len(teacher)
        self.parts["student"].append(np.append(ids, self.sep_id).astype(np.uint32))
        self.stats["documents"] += 1
        self.stats["bytes"] += len(doc.encode("utf-8"))
        self.stats["text_tokens"] += len(ids)
        self.total += len(ids) + 1

    def arrays(self, max_tokens: int | None) -> dict[str, np.ndarray]:
        """The concatenated streams, the student's (and holder, piece) cut to max_tokens."""
        if not self.parts["student"]:
            raise DataError("data.sources is empty; name at least one file, directory, 'bundled' or Hub dataset")
        return {name: np.concatenate(parts)[:max_tokens] if name != "teacher" else np.concatenate(parts)
                for name, parts in self.parts.items() if parts}


def _tokenize_sources(sources, corpus: _Corpus, text_field: str, tmp: Path, max_tokens: int | None) -> list[str]:
    """Read every document of `sources` into `corpus` (until max_tokens); returns the source names."""
    names = []
    for source in sources:
        for item in _expand(source):
            names.append(item.name if isinstance(item, Path) else
                         item.path.name if isinstance(item, SavedDataset) else str(item))
            for number, doc in enumerate(_documents(item, text_field, tmp), 1):
                corpus.add(doc, f"{names[-1]} (document {number})")
                if max_tokens is not None and corpus.total >= max_tokens:
                    return names
    return names


def prepare_corpus(
    sources: list[str | os.PathLike],
    tokenizer,
    out_dir: str | os.PathLike,
    seq_len: int,
    val_fraction: float = 0.01,
    seed: int = 0,
    separator: str | None = None,
    text_field: str = "text",
    max_tokens: int | None = None,
    bos: bool | None = None,
    vocab: VocabMap | None = None,
) -> dict:
    """Tokenize `sources` with `tokenizer` (the student's), pack into rows of seq_len tokens, split, write out_dir.

    Documents are concatenated, each followed by the separator token (see separator_id), and cut into
    consecutive rows [seq_len]; the incomplete last row is dropped. Every row starts with the tokens the
    tokenizer itself puts at the start of a sequence (bos=None: e.g. <bos> for Gemma, nothing for SmolLM2
    or GPT-2; bos=True forces its bos token, bos=False none): teachers such as Gemma predict far worse
    without them. A seeded permutation picks round(n * val_fraction) rows (at least 1 when val_fraction > 0)
    for val.bin; the rest keep their order in train.bin. max_tokens caps the tokens read (a quick demo).

    vocab: None when `tokenizer` is the teacher's own; for a derived student vocabulary, the VocabMap from the
    teacher's tokenizer to `tokenizer` (teachers.vocab): every document is encoded by both and checked to nest
    (encode_nested: DataError naming the document otherwise), and each split also stores the teacher's view of
    its rows (TeacherView; files in the module docstring). Returns (and writes to meta.json) stats.
    """
    if not isinstance(seq_len, int) or seq_len < 2:
        raise DataError(f"data.seq_len must be an int >= 2, got {seq_len!r}")
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"data.val_fraction must be in [0, 1), got {val_fraction!r}")
    if vocab is not None and tokenizer_hash(vocab.student_tokenizer) != tokenizer_hash(tokenizer):
        raise DataError("prepare_corpus: vocab maps to another tokenizer than the one given; pass the VocabMap "
                        "built for this student tokenizer")
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    sep, sep_id = separator_id(tokenizer, separator)
    prefix = row_prefix(tokenizer, bos)
    if len(prefix) >= seq_len:
        raise DataError(f"data.seq_len={seq_len} leaves no room after the row prefix {prefix}; raise it")
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        corpus = _Corpus(tokenizer, sep_id, vocab)
        names = _tokenize_sources(sources, corpus, text_field, tmp, max_tokens)
        streams = corpus.arrays(max_tokens)
        views = _TeacherViews(streams, prefix, seq_len, vocab, sep_id) if vocab is not None else None
        meta = _write_split(streams, prefix, tokenizer, tmp, seq_len, val_fraction, seed, names, views)
        meta.update(corpus.stats, separator=sep, separator_id=sep_id, text_field=text_field, max_tokens=max_tokens,
                    bytes_per_token=corpus.stats["bytes"] / max(corpus.stats["text_tokens"], 1))
        if vocab is not None:
            meta["tokens_per_teacher_token"] = corpus.stats["text_tokens"] / max(corpus.stats["teacher_text_tokens"], 1)
        shutil.rmtree(tmp / "hf", ignore_errors=True)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
        tmp.chmod(0o755)  # mkdtemp makes it private
        _replace_dir(tmp, out_dir)
    except OSError as exc:  # disk full, quota, permissions: the temp dir goes, any older out_dir stays
        raise DataError(f"{exc.filename or out_dir}: cannot write the prepared data ({exc.strerror or exc}); "
                        "free disk space or fix the permissions, then rerun") from exc
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"prepared {out_dir}: {meta['documents']} documents, {meta['tokens']['total']:,} tokens, "
          f"{meta['n_seqs']['train']} train / {meta['n_seqs']['val']} val rows of {seq_len}, "
          f"{meta['bytes_per_token']:.3f} bytes/token")
    return meta


def row_prefix(tokenizer, bos: bool | None) -> list[int]:
    """Token ids every packed row starts with (see prepare_corpus's bos)."""
    if bos is False:
        return []
    if bos is True:
        if tokenizer.bos_token_id is None:
            raise DataError("data.bos=true but the tokenizer has no bos token; unset it")
        return [tokenizer.bos_token_id]
    plain = tokenizer(["x"], add_special_tokens=False)["input_ids"][0]
    full = tokenizer(["x"], add_special_tokens=True)["input_ids"][0]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start])
    return []


def _write_split(streams: dict[str, np.ndarray], prefix: list[int], tokenizer, out: Path, seq_len: int,
                 val_fraction: float, seed: int, names: list[str], views: _TeacherViews | None) -> dict:
    tokens = streams["student"]
    body = seq_len - len(prefix)
    n_rows = len(tokens) // body
    if n_rows == 0:
        raise DataError(f"{', '.join(names[:3])}: only {len(tokens)} tokens, fewer than one sequence of "
                        f"{seq_len}; add text or lower data.seq_len")
    vocab_size = max(len(tokenizer), int(tokens.max()) + 1, *(t + 1 for t in prefix))
    dtype = np.uint16 if vocab_size <= 1 << 16 else np.uint32
    rows = np.empty((n_rows, seq_len), dtype=dtype)
    rows[:, : len(prefix)] = prefix
    rows[:, len(prefix):] = tokens[: n_rows * body].reshape(n_rows, body)
    n_val = 0 if val_fraction == 0 else min(n_rows - 1, max(1, round(n_rows * val_fraction)))
    if val_fraction > 0 and n_val < 1:
        raise DataError(f"{', '.join(names[:3])}: {n_rows} row(s) of {seq_len} tokens cannot be split into "
                        "train and val; add text, lower data.seq_len or set data.val_fraction=0")
    is_val = np.zeros(n_rows, dtype=bool)
    is_val[np.random.default_rng(seed).permutation(n_rows)[:n_val]] = True
    hashes = {}
    for split, mask in (("train", ~is_val), ("val", is_val)):
        part = np.ascontiguousarray(rows[mask])
        part.tofile(out / f"{split}.bin")
        digest = hashlib.sha256(part.tobytes())
        if views is not None:
            views.write(out, split, np.flatnonzero(mask), digest)
        hashes[split] = digest.hexdigest()
    return {
        "format": _FORMAT_VERSION, "dtype": np.dtype(dtype).name, "seq_len": seq_len,
        "n_seqs": {"train": n_rows - n_val, "val": n_val},
        "tokens": {"total": len(tokens), "packed": n_rows * body, "dropped": len(tokens) - n_rows * body},
        "row_prefix": prefix, "vocab": views.vocab.spec if views is not None else "teacher",
        "vocab_size": len(tokenizer), "tokenizer_hash": tokenizer_hash(tokenizer),
        "teacher_view": views.meta() if views is not None else None,
        "data_hash": hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest(),
        "split_hashes": hashes, "sources": names, "val_fraction": val_fraction, "seed": seed,
    }


class _TeacherViews:
    """Writes the teacher's view of packed rows (see TeacherView): for row r, the window is the teacher ids
    of the row prefix, one context token (the teacher token before the one holding the row's first body
    token; the separator at the start of the corpus), then the teacher tokens holding the row's body."""

    def __init__(self, streams: dict[str, np.ndarray], prefix: list[int], seq_len: int, vocab: VocabMap,
                 sep_id: int):
        self.teacher, self.holder, self.piece = streams["teacher"], streams["holder"], streams["piece"]
        self.body, self.vocab = seq_len - len(prefix), vocab
        self.separator = int(vocab.teacher_id[sep_id])
        self.prefix = [int(vocab.teacher_id[t]) for t in prefix]
        if any(t < 0 for t in self.prefix):
            raise DataError(f"row prefix {prefix}: a token without a teacher token; set data.bos=false")
        self.dtypes = {"ids": np.uint16 if len(vocab.pieces) <= 1 << 16 else np.uint32,
                       "pos": np.uint16 if seq_len < (1 << 16) - 1 else np.uint32, "piece": np.uint16}
        if len(self.piece) and int(self.piece.max()) >= 1 << 16:
            raise DataError("a teacher token of more than 65,535 student tokens; use a larger student.vocab")

    def window(self, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(teacher ids [T_w], pos [L], piece [L]) of packed row `row`."""
        span = slice(row * self.body, (row + 1) * self.body)
        first, last = int(self.holder[span.start]), int(self.holder[span.stop - 1])
        context = int(self.teacher[first - 1]) if first > 0 else self.separator
        ids = np.concatenate([self.prefix, [context], self.teacher[first:last + 1]])
        lead = len(self.prefix)
        pos = np.concatenate([np.arange(lead), lead + 1 + self.holder[span] - first])
        piece = np.concatenate([np.zeros(lead, dtype=np.int64), self.piece[span]])
        return ids, pos, piece

    def write(self, out: Path, split: str, rows: np.ndarray, digest) -> None:
        """Write split's view files for the packed rows `rows` (in split order); feed their bytes to digest."""
        windows = [self.window(int(r)) for r in rows]
        offsets = np.cumsum([0] + [len(ids) for ids, _, _ in windows]).astype(np.int64)
        arrays = {"teacher": np.concatenate([ids for ids, _, _ in windows] or [[]]).astype(self.dtypes["ids"]),
                  "teacher_offsets": offsets,
                  "pos": np.array([pos for _, pos, _ in windows], dtype=self.dtypes["pos"]),
                  "piece": np.array([piece for _, _, piece in windows], dtype=self.dtypes["piece"])}
        for name, array in arrays.items():
            array = np.ascontiguousarray(array)
            array.tofile(out / f"{split}.{name}.bin")
            digest.update(array.tobytes())

    def meta(self) -> dict:
        tok = self.vocab.teacher_tokenizer
        return {"ids_dtype": np.dtype(self.dtypes["ids"]).name, "pos_dtype": np.dtype(self.dtypes["pos"]).name,
                "piece_dtype": np.dtype(self.dtypes["piece"]).name, "separator_id": self.separator,
                "row_prefix": self.prefix, "vocab_size": len(tok), "tokenizer_hash": tokenizer_hash(tok)}


def _replace_dir(tmp: Path, out_dir: Path) -> None:
    """Move the finished temp dir to out_dir, replacing an older one (moved aside first, then removed)."""
    old = None
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@dataclass(frozen=True)
class TeacherView:
    """The teacher's side of one packed row of a dataset with a derived student vocabulary.

    ids: LongTensor [T_w], teacher token ids: the teacher ids of the row prefix (P tokens, e.g. BOS; P = 0
        for SmolLM2 and GPT-2 style tokenizers), then ONE context token (the teacher token before the one
        holding the row's first body token; at the very start of the corpus the separator), then the teacher
        tokens holding the row's student tokens; it ends at ids[pos[-1]].
    pos: LongTensor [L], pos[t] indexes into ids the teacher token holding student position t; a row-prefix
        position t < P maps to ids[t], the same special token in the teacher's vocabulary.
    piece: LongTensor [L], piece[t] is the index of student token t among the pieces of ids[pos[t]]
        (teachers.vocab.VocabMap.pieces); 0 for the prefix.
    Every body position t >= P has ids[pos[t] - 1] (the teacher token whose next-token distribution predicts
    ids[pos[t]]): for P = 0, ids[0] is context before ids[pos[0]].
    """

    ids: torch.Tensor
    pos: torch.Tensor
    piece: torch.Tensor


class TokenDataset(Dataset):
    """Memory-mapped packed rows of a prepared directory: ds[i] -> LongTensor [seq_len] (student token ids).

    meta: meta.json ("vocab": the student.vocab spelling, "vocab_size": the student's vocabulary size, ...).
    teacher_view(i): the teacher's view of row i (datasets with a derived student vocabulary only).
    Raises DataError for a missing or damaged directory, naming the file and the fix.
    """

    def __init__(self, out_dir: str | os.PathLike, split: str = "train"):
        self.dir = Path(out_dir)
        meta_path = self.dir / "meta.json"
        if not meta_path.is_file():
            raise DataError(f"{meta_path}: not found; run the prepare stage (teachers.data.prepare_corpus) first")
        self.meta = json.loads(meta_path.read_text())
        if int(self.meta.get("format", 1)) > _FORMAT_VERSION:
            raise DataError(f"{meta_path}: data format {self.meta['format']} is newer than this spikedistill reads "
                            f"({_FORMAT_VERSION}); upgrade spikedistill or rerun the prepare stage")
        self.meta.setdefault("vocab", "teacher")  # format 1 had only the teacher's vocabulary
        if split not in self.meta["n_seqs"]:
            raise DataError(f"{self.dir}: no split {split!r}; use one of {sorted(self.meta['n_seqs'])}")
        self.split = split
        self.seq_len = int(self.meta["seq_len"])
        n = int(self.meta["n_seqs"][split])
        self._rows = self._map(f"{split}.bin", self.meta["dtype"], (n, self.seq_len))
        self._views = self._open_views(n) if self.meta.get("teacher_view") else None

    def _map(self, name: str, dtype: str, shape: tuple[int, ...]) -> np.memmap | None:
        path, dtype = self.dir / name, np.dtype(dtype)
        if not path.is_file() or path.stat().st_size != int(np.prod(shape)) * dtype.itemsize:
            raise DataError(f"{path}: missing or wrong size for {' x '.join(map(str, shape))} {dtype.name}; "
                            "rerun the prepare stage")
        return np.memmap(path, dtype=dtype, mode="r", shape=shape) if shape[0] else None

    def _open_views(self, n: int) -> tuple:
        view, split = self.meta["teacher_view"], self.split
        offsets = self._map(f"{split}.teacher_offsets.bin", "int64", (n + 1,))
        total = int(offsets[-1]) if offsets is not None else 0
        return (self._map(f"{split}.teacher.bin", view["ids_dtype"], (total,)), offsets,
                self._map(f"{split}.pos.bin", view["pos_dtype"], (n, self.seq_len)),
                self._map(f"{split}.piece.bin", view["piece_dtype"], (n, self.seq_len)))

    def __len__(self) -> int:
        return 0 if self._rows is None else self._rows.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self._rows[i].astype(np.int64))

    def teacher_view(self, i: int) -> TeacherView:
        """The teacher's view of row i (see TeacherView): ids [T_w], pos [seq_len], piece [seq_len].

        Raises DataError on a dataset prepared with the teacher's own vocabulary (its rows are teacher
        tokens already)."""
        if self._views is None:
            raise DataError(f"{self.dir}: prepared with student.vocab=teacher, whose rows are teacher tokens "
                            "already; a teacher view exists only for student.vocab=subset:N or bytes")
        ids, offsets, pos, piece = self._views
        i = range(len(self))[i]
        window = ids[int(offsets[i]):int(offsets[i + 1])]
        return TeacherView(*(torch.from_numpy(np.asarray(a, dtype=np.int64)) for a in (window, pos[i], piece[i])))

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 bytes of source text per text token (separators excluded), over the whole corpus."""
        return float(self.meta["bytes_per_token"])

    @property
    def data_hash(self) -> str:
        """sha256 of this split's packed token rows (and, with a derived vocabulary, their teacher views)."""
        return self.meta["split_hashes"][self.split]
