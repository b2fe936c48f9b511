"""Loading a recipe: YAML file + `key=value` overrides -> validated ``Recipe``; resolved YAML; hashing."""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from pipeline.errors import ConfigError
from pipeline.schema import Recipe, check_values

_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"{path}: recipe file not found (check the path; shipped recipes live in recipes/)")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"{path}: not valid YAML{at} ({_first_line(exc)}); fix the recipe syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a recipe must be a YAML mapping of sections, got {type(data).__name__}")
    return data


def parse_override(text: str) -> tuple[list[str | int], Any]:
    """Parse one `dotted.key=value` override into (path parts, value); the value is read as YAML.

    Numeric path parts become ints so `teacher.layer_map.3=20` addresses the integer key 3.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not _KEY.match(key):
        raise ConfigError(f"override {text!r}: expected dotted.key=value (e.g. distill.train.steps=200)")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"override {text!r}: the value is not valid YAML (quote it)") from None
    if isinstance(value, dict) and raw.strip().endswith(":") and not raw.strip().startswith("{"):
        value = raw.strip()  # `student.vocab=subset:` is a word ending in a colon, not a one-key mapping
    return [int(p) if p.isdigit() else p for p in key.split(".")], value


def _nest(parts: list[str | int], value: Any) -> dict:
    out: Any = value
    for part in reversed(parts):
        out = {part: out}
    return out


def did_you_mean(word: str, options, prefix: str = "") -> str:
    """' did you mean <prefix><X>?' for the closest of `options` to `word` (difflib), or ''."""
    close = difflib.get_close_matches(str(word), [str(o) for o in options], n=1, cutoff=0.6)
    return f" did you mean {prefix}{close[0]}?" if close else ""


def _list_value(key: str, value: Any) -> list:
    """A value for a list-typed key: a list stays, a single item becomes a one-element list."""
    if isinstance(value, list):
        return value
    how = f"write {key}=[a,b] for several items or {key}=a for one (in a YAML file: [a, b])"
    if isinstance(value, dict) or (isinstance(value, str) and "," in value):
        raise ConfigError(f"{key}: a list, got {value!r}; {how}")
    return [value]


def _conform(node: DictConfig, update: Any, prefix: str = "") -> Any:
    """Check `update` (a dict merged onto the schema node) key by key before OmegaConf sees it.

    Unknown keys of a schema section are errors with a "did you mean" (difflib) and the section's keys; a
    single item for a list-typed key becomes a one-element list; a scalar where the schema has a section or
    a mapping is an error saying how to write one. Types of scalar values are left to OmegaConf.
    """
    where = prefix.rstrip(".") or "the recipe"
    if not isinstance(update, dict):
        raise ConfigError(f"{where}: a section of keys, got {update!r}; set its keys one by one, e.g. "
                          f"{prefix}{next(iter(node.keys()), 'key')}=...")
    if OmegaConf.get_type(node) is dict:  # a free mapping (student.config, teacher.layer_map)
        return update
    out = {}
    for key, value in update.items():
        path = f"{prefix}{key}"
        if key not in node:
            known = [str(k) for k in node]
            hint = did_you_mean(key, known, prefix) or f" keys of {where}: {', '.join(known)}."
            raise ConfigError(f"{path}: unknown key;{hint} (the schema is pipeline/schema.py)")
        child = node._get_node(key)
        if OmegaConf.is_list(child):
            value = _list_value(path, value)
        elif OmegaConf.is_dict(child):
            if not isinstance(value, dict):
                example = ("student.config.token_mixer=sfsa" if path == "student.config" else
                           "teacher.layer_map.3=20" if path == "teacher.layer_map" else
                           f"{path}.{next(iter(child.keys()), 'key')}=...")
                raise ConfigError(f"{path}: a mapping of keys, got {value!r}; set one key at a time, e.g. "
                                  f"{example}")
            value = _conform(child, value, f"{path}.")
        out[key] = value
    return out


def _merge(base: DictConfig, update: Any, origin: str) -> DictConfig:
    try:
        update = _conform(base, update)
    except ConfigError as exc:
        raise ConfigError(f"{exc} (in {origin})") from None
    try:
        return OmegaConf.merge(base, update)  # type: ignore[return-value]
    except (OmegaConfBaseException, TypeError) as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(f"{key}: {_first_line(exc)} (in {origin})") from None


def _apply_file(cfg: DictConfig, path: Path, chain: tuple[Path, ...]) -> DictConfig:
    """Merge a recipe file onto cfg, after its `base:` recipe (a path relative to the file) if it names one."""
    data = _read_yaml(path)
    base = data.pop("base", None)
    if base is not None:
        if not isinstance(base, str) or not base:
            raise ConfigError(f"{path}: base must be the path of another recipe file, got {base!r}")
        base_path = (path.parent / base).resolve()
        if base_path in chain or base_path == path.resolve():
            raise ConfigError(f"{path}: base {base!r} includes itself (a cycle of base: keys); fix the chain")
        cfg = _apply_file(cfg, base_path, (*chain, path.resolve()))
    _file_relative(data, path)
    return _merge(cfg, data, str(path))


def _file_relative(data: dict, path: Path) -> None:
    """A recipe file's `distributed.deepspeed_config`, like its `base:`, is relative to the file; it is stored
    as the path from the working directory (absolute when outside it). On the command line it stays relative
    to the working directory, like every other path."""
    dist = data.get("distributed")
    value = dist.get("deepspeed_config") if isinstance(dist, dict) else None
    if not isinstance(value, str) or not value or Path(value).expanduser().is_absolute():
        return
    full = (path.parent / value).resolve()
    try:
        dist["deepspeed_config"] = str(full.relative_to(Path.cwd()))
    except ValueError:
        dist["deepspeed_config"] = str(full)


def load_recipe(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Load `path` (None = schema defaults), apply `key=value` overrides, validate; returns a Recipe.

    A recipe may start with `base: other.yaml` (relative to itself): that recipe is loaded first and this
    file's keys are merged over it (lists are replaced, not appended), recursively. A file's
    `distributed.deepspeed_config` is relative to that file too (overrides: to the working directory).

    Raises ConfigError with one line naming the file, the override or the dotted key.
    """
    cfg: DictConfig = OmegaConf.structured(Recipe)
    if path is not None:
        cfg = _apply_file(cfg, Path(path), ())
    for text in overrides:
        parts, value = parse_override(text)
        cfg = _merge(cfg, _nest(parts, value), f"override {text!r}")
    try:
        recipe = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or "?"
        raise ConfigError(f"{key}: {_first_line(exc)} (set it in the recipe)") from None
    check_values(recipe)
    check_student(recipe)
    return recipe


def recipe_to_dict(recipe: Recipe) -> dict:
    """The recipe as plain nested dicts/lists (what config.yaml holds)."""
    return asdict(recipe)


def recipe_to_yaml(recipe: Recipe) -> str:
    """The resolved recipe as YAML text, loadable again with load_recipe."""
    return yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False)


def _jsonable(obj: Any) -> Any:
    return asdict(obj) if is_dataclass(obj) and not isinstance(obj, type) else str(obj)


def to_plain(obj: Any) -> Any:
    """Dataclasses -> dicts, recursively, with JSON-safe keys (what done.json stores)."""
    return json.loads(json.dumps(obj, sort_keys=True, default=_jsonable))


def stable_hash(obj: Any) -> str:
    """sha256 (hex, 16 chars) of a JSON-able object; key order does not matter."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_jsonable)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def diff_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested dicts (for 'config changed: ...' messages)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new), key=str):
            sub = f"{prefix}.{key}" if prefix else str(key)
            out += diff_keys(old.get(key), new.get(key), sub)
        return out
    return [] if old == new else [prefix or "<root>"]


def student_config(recipe: Recipe, vocab_size: int):
    """The SpikeGPTConfig of `student.preset` + `student.config` overrides, with the student's vocab size (the
    teacher's, or that of the tokenizer derived from it by student.vocab).

    Unknown fields and values SpikeGPTConfig rejects become ConfigError naming `student.config.<field>`.
    """
    from students import PRESETS, SpikeGPTConfig, StudentError

    preset, overrides = recipe.student.preset, dict(recipe.student.config)
    if preset not in PRESETS:
        raise ConfigError(f"student.preset: must be one of {'|'.join(PRESETS)}, got {preset!r};"
                          f"{did_you_mean(preset, PRESETS)}")
    if "vocab_size" in overrides:
        raise ConfigError("student.config.vocab_size: the vocabulary comes from the student's tokenizer (the "
                          "teacher's, or one derived from it by student.vocab); remove this key")
    known = SpikeGPTConfig.from_preset(preset, vocab_size=vocab_size).to_dict()
    for key in overrides:
        if key not in known:
            fields = [k for k in known if not k.startswith("_") and k != "vocab_size"]
            raise ConfigError(f"student.config.{key}: not a SpikeGPTConfig field;"
                              f"{did_you_mean(key, fields, 'student.config.') or ' see students/config.py'}")
    try:
        return SpikeGPTConfig.from_preset(preset, **overrides, vocab_size=vocab_size)
    except StudentError as exc:
        match = re.search(r"SpikeGPTConfig\.(\w+)", str(exc))
        key = f"student.config.{match.group(1)}" if match else "student.config"
        raise ConfigError(f"{key}: {_first_line(exc)}") from None


def check_student(recipe: Recipe) -> None:
    """Check the student section before any stage runs: the preset, every student.config field and value
    (a placeholder vocabulary stands in for the teacher's), data.seq_len against max_position, and the
    student side of teacher.layer_map. Raises ConfigError naming the key."""
    from students import PRESETS

    placeholder = PRESETS.get(recipe.student.preset, {}).get("vocab_size", 256)
    config = student_config(recipe, placeholder)
    if config.max_position and recipe.data.seq_len > config.max_position:
        raise ConfigError(f"data.seq_len: {recipe.data.seq_len} exceeds the student's max_position "
                          f"{config.max_position}; lower data.seq_len or raise student.config.max_position")
    for layer in recipe.teacher.layer_map:
        if layer >= config.n_layer:
            raise ConfigError(f"teacher.layer_map.{layer}: the student has layers 0..{config.n_layer - 1}; "
                              "map only those")
