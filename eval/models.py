"""Loading models for evaluation: a student/HF model directory, or a teacher spec through `teachers`."""

from __future__ import annotations

import json
from pathlib import Path

from eval import EvalError

SPIKEGPT_TYPE = "spikegpt"


def not_a_model(path: str | Path) -> str | None:
    """Why a directory is not a model directory, naming the model inside it when it holds one (a run
    directory -> its export/model), or None when it has a config.json."""
    path = Path(path)
    if (path / "config.json").is_file():
        return None
    for inner in (path / "export" / "model", path / "model"):
        if (inner / "config.json").is_file():
            kind = "a run directory" if inner.parent.name == "export" else "an export stage folder"
            return f"{path}: {kind}, not a model; its exported model is {inner}: pass that path instead"
    if (path / "config.yaml").is_file() or (path / "prepare").is_dir():
        return (f"{path}: a run directory without an exported model yet; finish its export stage "
                f"(spikedistill run RECIPE --run-dir {path}) and pass {path / 'export' / 'model'}")
    return f"{path}: not a model directory (no config.json); point at an exported model, e.g. runs/<name>/export/model"


def model_type_of(model_dir: str | Path) -> str:
    """The `model_type` in MODEL_DIR/config.json; EvalError if the directory is not a HF model."""
    cfg = Path(model_dir) / "config.json"
    problem = not_a_model(model_dir)
    if problem:
        raise EvalError(problem)
    try:
        return json.loads(cfg.read_text()).get("model_type", "")
    except json.JSONDecodeError as exc:
        raise EvalError(f"{cfg}: unreadable JSON ({exc.msg}); re-export the model") from exc


def is_recurrent(model) -> bool:
    """True for the spiking student, whose state can be streamed chunk by chunk through its recurrent state (cache)."""
    return getattr(model.config, "model_type", "") == SPIKEGPT_TYPE


def can_stream(model, n_tokens: int) -> bool:
    """Whether n_tokens can go through the student's state in one stream (its max_position, 0 = unbounded)."""
    limit = getattr(model.config, "max_position", 0) or 0
    return is_recurrent(model) and (not limit or n_tokens <= limit)


def window_length(model, requested: int) -> int:
    """Window length for models that cannot stream a document: the request, capped by a set max_position."""
    limit = getattr(model.config, "max_position", 0) or 0
    return min(requested, limit) if limit else requested


def load_model_dir(model_dir: str | Path, dtype=None):
    """Load (model, tokenizer) from a local HF directory (the student or any causal LM), in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_type_of(model_dir) == SPIKEGPT_TYPE:
        import students  # noqa: F401  (registers "spikegpt" with the Auto classes)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise EvalError(
            f"{model_dir}: no usable tokenizer ({type(exc).__name__}); save the teacher's tokenizer into it "
            "(the export stage does this)"
        ) from exc
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    return model.eval(), tokenizer


def load_any(spec: str, dtype: str = "fp32"):
    """(model, tokenizer) from a model directory, or from a teacher spec (alias, hub id, GGUF file)."""
    path = Path(spec)
    if path.is_dir():
        return load_model_dir(path)  # EvalError naming the model inside a run directory, if any
    from teachers import load_teacher

    teacher = load_teacher(spec, dtype=dtype)
    return teacher.model.eval(), teacher.tokenizer


def prefix_token_id(tokenizer) -> int:
    """The token every document is conditioned on: BOS if the tokenizer has one, else EOS (as lm-eval's
    hf model does)."""
    tok = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if tok is None:
        raise EvalError("tokenizer has neither bos_token nor eos_token; set one in tokenizer_config.json")
    return tok
