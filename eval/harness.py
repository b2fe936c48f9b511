"""The `spikegpt` model for lm-evaluation-harness, and `evaluate_tasks` (student and teacher in one table).

`lm_eval --model spikegpt --model_args pretrained=DIR,batch_size=8 --tasks ... --include_path eval/tasks`
finds this class through the start-up hook in eval/lm_eval_hook.py (install it once with
`python -m eval.lm_eval_hook install`); from Python, importing this module registers it (after lm-eval's own
models, so `hf`, `dummy` and the rest stay available).

BOS: a tokenizer that adds BOS itself (Llama, Gemma) gets exactly one BOS in front of every loglikelihood
context, rolling document and generation prompt; a plain tokenizer gets none in contexts and prompts, and
its BOS (else EOS) as the conditioning token of a rolling document or an empty context, as lm-eval's `hf`.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path

import lm_eval.models  # noqa: F401  (lm-eval's built-in models first: it skips them once the registry has any)
import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm

from eval import EvalError
from eval.generate import generate_text
from eval.models import (
    SPIKEGPT_TYPE,
    can_stream,
    load_model_dir,
    model_type_of,
    prefix_token_id,
    window_length,
)
from eval.scoring import Protocol, encode_document, protocol_nll, score_batch, stream_logprobs

TASKS_DIR = Path(__file__).parent / "tasks"
DEFAULT_MAX_LENGTH = 1024
DEFAULT_MAX_GEN_TOKS = 256


@register_model("spikegpt")
class SpikeGPTLM(TemplateLM):
    """lm-eval LM around the spiking student (or any HF causal LM with a cache).

    pretrained: a model directory or an already-loaded model (then pass `tokenizer`). max_length: the
    context for batched scoring and generation (default: the config's max positions, else 1024).
    batch_size: an int, or lm-eval's "auto" / "auto:N" (see `batch_size_of`); max_batch_size caps "auto"
    (default 64, as lm-eval's `hf`). dtype: fp32 / bf16 / fp16 / any torch dtype name, or "auto" (the saved
    dtype, as with `hf`).
    rolling: how loglikelihood_rolling scores a document: "windows" (default: the protocol of eval/scoring.py
    with windows of max_length tokens and stride rolling_stride, default max_length // 2; the default of
    `spikedistill bpb --context max_length` and of `evaluate_tasks`, so the same student and text give the same
    bits/byte through either) or "stream" (one pass through the recurrent state in max_length chunks, every
    token conditioned on the whole document; a model that cannot stream a document is scored in windows).
    """

    def __init__(
        self,
        pretrained,
        tokenizer=None,
        batch_size: int | str = 8,
        max_length: int | None = None,
        device: str | None = None,
        dtype: str | None = None,
        max_batch_size: int | None = None,
        rolling: str = "windows",
        rolling_stride: int | None = None,
        **unknown,
    ):
        super().__init__()
        if unknown:
            raise EvalError(
                f"spikegpt: unknown model_args {sorted(unknown)}; valid: pretrained, batch_size, max_batch_size, "
                "max_length, device, dtype, rolling, rolling_stride"
            )
        if rolling not in ("stream", "windows"):
            raise EvalError(f"spikegpt: rolling={rolling!r}; use rolling=stream or rolling=windows")
        if isinstance(pretrained, (str, Path)):
            self.model, self.tokenizer = load_model_dir(pretrained, dtype=_torch_dtype(dtype))
        elif tokenizer is None:
            raise EvalError("SpikeGPTLM: a model instance needs tokenizer=...; pass the model's tokenizer")
        else:
            self.model, self.tokenizer = pretrained.eval(), tokenizer
        # lm-eval's CLI passes device="cuda" by default; fall back to the CPU as its hf model does
        if device is None or (str(device).startswith("cuda") and not torch.cuda.is_available()):
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self._device = torch.device(device)
        self.model.to(self._device)
        self._max_length = int(max_length) if max_length else self._config_max_length()
        self.batch_size_per_gpu = batch_size_of(batch_size, max_batch_size, self._device, self._probe)
        self.rolling = rolling
        self.rolling_stride = int(rolling_stride) if rolling_stride else None

    @torch.no_grad()
    def _probe(self, batch_size: int) -> None:
        """One forward of the largest input a request gives: [batch_size, max_length] tokens, every logit."""
        self.model(torch.zeros(batch_size, self.max_length, dtype=torch.long, device=self._device))

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None):
        """Merge lm-eval's CLI settings under --model_args (so `--model_args ...,batch_size=8` wins over the
        CLI's own --batch_size default instead of clashing with it)."""
        extra = {k: v for k, v in (additional_config or {}).items() if v is not None}
        return cls(**(extra | dict(arg_dict)))

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None):
        from lm_eval.utils import simple_parse_args_string

        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    def _config_max_length(self) -> int:
        cfg = self.model.config
        for key in ("max_position", "ctx_len", "max_position_embeddings", "n_positions"):
            if getattr(cfg, key, None):
                return int(getattr(cfg, key))
        return DEFAULT_MAX_LENGTH

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        return prefix_token_id(self.tokenizer)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def device(self):
        return self._device

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Ids of `string`, its text read literally (text that spells a special token, e.g. "<|endoftext|>",
        stays text): by default with the tokenizer's own special tokens (one BOS for a BOS-adding tokenizer); a
        string that starts with the prefix token's text gets that token once and nothing added."""
        prefix = self.tokenizer.decode([self.prefix_token_id])
        if add_special_tokens is None and prefix and string.startswith(prefix):
            return [self.prefix_token_id] + encode_document(self.tokenizer, string[len(prefix):])
        return self.tokenizer.encode(string, add_special_tokens=add_special_tokens is not False,
                                     split_special_tokens=True)

    def _loglikelihood_tokens(
        self, requests, disable_tqdm: bool = False, **kwargs
    ) -> list[tuple[float, bool]]:
        """requests: [((context, continuation), context ids, continuation ids)] -> [(log p, is_greedy)]."""
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        long_rows = [i for i in order if self._too_long(requests[i])]
        short_rows = [i for i in order if not self._too_long(requests[i])]
        bar = tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm)
        for i in long_rows:
            results[i] = self._score_long(requests[i][1], requests[i][2])
            bar.update(1)
        for start in range(0, len(short_rows), self.batch_size_per_gpu):
            rows = short_rows[start : start + self.batch_size_per_gpu]
            scored = score_batch(self.model, [(requests[i][1], requests[i][2]) for i in rows])
            for i, res in zip(rows, scored):
                results[i] = res
            bar.update(len(rows))
        bar.close()
        for (pair, _, _), res in zip(requests, results):
            if pair is not None:
                self.cache_hook.add_partial("loglikelihood", pair, res)
        return results

    def _too_long(self, request) -> bool:
        return len(request[1]) + len(request[2]) - 1 > self.max_length

    def _score_long(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """Student: stream the whole input; other models: keep the last max_length tokens (as lm-eval's
        hf)."""
        if can_stream(self.model, len(context) + len(continuation)):
            logps, greedy = stream_logprobs(self.model, context + continuation, self.max_length)
            n = len(continuation)
            return float(logps[-n:].sum()), bool(greedy[-n:].all())
        keep = window_length(self.model, self.max_length) + 1 - len(continuation)
        if keep < 1:
            raise EvalError(
                f"continuation of {len(continuation)} tokens exceeds max_length={self.max_length}; "
                "raise max_length in --model_args"
            )
        return score_batch(self.model, [(context[-keep:], continuation)])[0]

    def rolling_protocol(self, n_tokens: int) -> Protocol:
        """The protocol loglikelihood_rolling uses for a document of n_tokens (see the class docstring)."""
        if self.rolling == "stream" and can_stream(self.model, n_tokens + 1):
            return Protocol("stream", self.max_length)
        window = window_length(self.model, self.max_length)
        stride = min(self.rolling_stride, window) if self.rolling_stride else None
        return Protocol("windows", window, stride)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood after one prefix token, under `rolling_protocol`."""
        out = []
        for req in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            (text,) = req.args
            tokens = encode_document(self.tokenizer, text)
            protocol = self.rolling_protocol(len(tokens))
            value = -protocol_nll(self.model, tokens, self.prefix_token_id, protocol, self.batch_size_per_gpu)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), value)
            out.append(value)
        return out

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, per gen_kwargs) continuation cut at the first `until` string, the first stop token
        (the model's eos_token_id list: an exported student's EOS and document separator; see
        eval.generate.stop_token_ids) or max_gen_toks, with or without `until`."""
        out = []
        for req in tqdm(requests, desc="generate_until", disable=disable_tqdm):
            context, gen_kwargs = req.args
            text = self._generate_one(context, dict(gen_kwargs))
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            out.append(text)
        return out

    def _generate_one(self, context: str, gen_kwargs: dict) -> str:
        until = gen_kwargs.pop("until", None) or []  # stop tokens end generation in generate_text, until or not
        until = [until] if isinstance(until, str) else [s for s in until if s]
        max_new = int(gen_kwargs.pop("max_gen_toks", DEFAULT_MAX_GEN_TOKS))
        temperature = float(gen_kwargs.pop("temperature", 0.0)) if gen_kwargs.pop("do_sample", False) else 0.0
        ids = self.tok_encode(context)
        if not can_stream(self.model, len(ids) + max_new):
            keep = max(1, window_length(self.model, self.max_length) - max_new)
            lead = ids[:1] if keep > 1 and ids[:1] == [self.tokenizer.bos_token_id] else []
            ids = lead + ids[len(ids) - keep + len(lead) :] if len(ids) > keep else ids
        text = generate_text(
            self.model,
            self.tokenizer,
            ids,
            max_new,
            temperature=temperature,
            top_k=int(gen_kwargs.get("top_k", 0) or 0),
            top_p=float(gen_kwargs.get("top_p", 1.0) or 1.0),
            stop=(lambda so_far: any(s in so_far for s in until)) if until else None,
        )
        return _cut_at_stops(text, until)


DEFAULT_MAX_BATCH_SIZE = 64  # lm-eval's hf: where "auto" starts on a GPU
CPU_AUTO_BATCH_SIZE = 8


def batch_size_of(batch_size: int | str, max_batch_size: int | None, device: torch.device,
                  probe: Callable[[int], None]) -> int:
    """The batch size for lm-eval's spellings, as its `hf` model reads them: an int (or its digits), "auto" or
    "auto:N".

    "auto" on a GPU: the largest size that runs `probe(size)` (a forward of max_length tokens per row) without
    running out of memory, from max_batch_size (default 64) down by x0.9 per failure (accelerate's
    find_executable_batch_size, as `hf`), 1 if none does. On a CPU there is no reliable out-of-memory error to back
    off from (with Linux's overcommit the allocation succeeds and the kernel kills the process later), so "auto"
    is a fixed 8, or max_batch_size if smaller. "auto:N" (`hf` detects again N times as the requests shorten) is "auto" detected once, at
    max_length tokens, the longest input any request gives, so the size holds for every batch.
    Raises EvalError for anything else.
    """
    text = str(batch_size).strip()
    head, _, every = text.partition(":")
    if text.isdigit() and int(text) > 0:
        return int(text)
    if head != "auto" or (every and not _positive_number(every)):
        raise EvalError(f"spikegpt: batch_size={batch_size!r}; use a positive integer, auto or auto:N")
    start = int(max_batch_size) if max_batch_size else DEFAULT_MAX_BATCH_SIZE
    if device.type != "cuda":
        return min(CPU_AUTO_BATCH_SIZE, start)
    from accelerate.utils import find_executable_batch_size

    def largest(size: int) -> int:
        probe(size)
        return size

    try:
        return find_executable_batch_size(largest, starting_batch_size=start)()
    except RuntimeError as exc:
        if "No executable batch size found" not in str(exc):
            raise
        return 1
    finally:
        torch.cuda.empty_cache()


def _positive_number(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


def _torch_dtype(name: str | None):
    """ "bf16" / "bfloat16" / "fp32" / ... -> torch dtype; "auto" -> "auto" (the saved dtype, as lm-eval's hf);
    None keeps the loader's default."""
    if not name:
        return None
    if name == "auto":
        return "auto"
    aliases = {
        "bf16": "bfloat16",
        "fp16": "float16",
        "fp32": "float32",
        "half": "float16",
        "float": "float32",
    }
    dtype = getattr(torch, aliases.get(name, name), None)
    if not isinstance(dtype, torch.dtype):
        raise EvalError(f"spikegpt: dtype={name!r} is not a torch dtype; use fp32, bf16, fp16 or auto")
    return dtype


def _cut_at_stops(text: str, stops: list[str]) -> str:
    """Text up to (not including) the earliest stop string."""
    cut = min([text.find(s) for s in stops if s and s in text], default=len(text))
    return text[:cut]


# ---------------------------------------------------------------- evaluate_tasks


def local_task_names() -> set[str]:
    """Names of the tasks and groups defined in eval/tasks (without indexing lm-eval's built-ins)."""
    from lm_eval.tasks import TaskManager

    return set(TaskManager(include_path=str(TASKS_DIR), include_defaults=False).all_tasks)


def task_manager_for(tasks: list[str]):
    """A TaskManager over eval/tasks, adding lm-eval's built-in tasks only when a task needs them."""
    from lm_eval.tasks import TaskManager

    local = local_task_names()
    needs_builtin = any(t not in local for t in tasks)
    manager = TaskManager(include_path=str(TASKS_DIR), include_defaults=needs_builtin)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise EvalError(
            f"unknown lm-eval task(s) {', '.join(unknown)}; local tasks: "
            f"{', '.join(sorted(local))} (or any lm-eval task name)"
        )
    return manager


class WindowedHFLM(HFLM):
    """lm-eval's `hf` model whose loglikelihood_rolling uses this project's windows protocol (every window led
    by the prefix token, so a BOS-adding tokenizer gets exactly one BOS per window; windows of max_length
    tokens, stride rolling_stride, default max_length // 2). Loglikelihood and generation are lm-eval's own,
    on a copy of the tokenizer that reads text literally (split_special_tokens), as `spikegpt` does."""

    def __init__(self, *args, rolling_stride: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.rolling_stride = rolling_stride
        self.tokenizer = copy.deepcopy(self.tokenizer)
        self.tokenizer.split_special_tokens = True

    def rolling_protocol(self, n_tokens: int = 0) -> Protocol:
        stride = min(self.rolling_stride, self.max_length) if self.rolling_stride else None
        return Protocol("windows", self.max_length, stride)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            (text,) = req.args
            tokens = encode_document(self.tokenizer, text)
            value = -protocol_nll(self.model, tokens, self.prefix_token_id, self.rolling_protocol(), self.batch_size)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), value)
            out.append(value)
        return out


DEFAULT_TASK_CONTEXT = 1024


def lm_for(
    spec: str,
    batch_size: int = 8,
    max_length: int | None = DEFAULT_TASK_CONTEXT,
    dtype: str = "fp32",
    rolling_stride: int | None = None,
):
    """An lm-eval LM for a spec, all scoring rolling documents under one windows protocol (max_length,
    rolling_stride): student dir -> `spikegpt` (rolling=windows); any other HF dir or teacher spec ->
    `WindowedHFLM` (lm-eval's `hf` with that rolling protocol)."""
    path = Path(spec)
    if path.is_dir():
        if model_type_of(path) == SPIKEGPT_TYPE:
            return SpikeGPTLM(str(path), batch_size=batch_size, max_length=max_length, rolling="windows",
                              rolling_stride=rolling_stride)
        model, tokenizer = load_model_dir(path)
    else:
        from teachers import load_teacher

        teacher = load_teacher(spec, dtype=dtype)
        model, tokenizer = teacher.model.eval(), teacher.tokenizer
    return WindowedHFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length,
                        rolling_stride=rolling_stride)


def rolling_protocol_text(max_length: int = DEFAULT_TASK_CONTEXT, rolling_stride: int | None = None) -> str:
    """The line naming the protocol of lm-eval's rolling (bits/byte, perplexity) tasks in our tables."""
    return (f"lm-eval loglikelihood_rolling for student and teacher: "
            f"{Protocol('windows', max_length, rolling_stride).describe()}")


def run_tasks(lm, tasks: list[str], limit: int | None = None, manager=None) -> dict:
    """Run lm-eval on an LM instance; returns lm-eval's results dict (without per-sample logs)."""
    import lm_eval

    manager = manager or task_manager_for(tasks)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=manager,
        limit=limit,
        log_samples=False,
        bootstrap_iters=1000,
        verbosity="WARNING",
    )
    if results is None:
        raise EvalError(f"lm-eval returned no results for tasks {tasks}")
    return results


def summarize(results: dict) -> dict[str, dict[str, float]]:
    """lm-eval results -> {task: {metric: value}} with the ',none' filter suffix dropped, stderrs kept."""
    table: dict[str, dict[str, float]] = {}
    for task, metrics in results.get("results", {}).items():
        row = {}
        for key, value in metrics.items():
            name, _, filt = key.partition(",")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and filt in ("none", ""):
                row[name] = float(value)
        table[task] = row
    return table


def side_by_side_markdown(rows: dict[str, dict[str, dict[str, float]]]) -> str:
    """{model label: {task: {metric: value}}} -> one markdown table, a column per model."""
    labels = list(rows)
    keys = sorted(
        {
            (t, m)
            for tab in rows.values()
            for t, ms in tab.items()
            for m in ms
            if not m.endswith("_stderr") and m != "sample_len"
        }
    )
    lines = ["| task | metric | " + " | ".join(labels) + " |", "|---|---|" + "---:|" * len(labels)]
    for task, metric in keys:
        cells = []
        for label in labels:
            value = rows[label].get(task, {}).get(metric)
            err = rows[label].get(task, {}).get(f"{metric}_stderr")
            cells.append("" if value is None else f"{value:.4f}" + (f" ± {err:.4f}" if err else ""))
        lines.append(f"| {task} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def evaluate_tasks(
    model_dir,
    tasks: list[str],
    output_dir=None,
    limit: int | None = None,
    batch_size: int = 8,
    teacher_spec: str | None = None,
    teacher_cache_dir=None,
    max_length: int = DEFAULT_TASK_CONTEXT,
    rolling_stride: int | None = None,
) -> dict:
    """Score a model (and optionally a teacher) on lm-eval tasks; write JSON + markdown into output_dir
    (default `eval.leaderboard.default_eval_dir(model_dir)`, never the model folder).

    Both models score rolling documents (bits/byte, perplexity tasks) under one protocol: windows of
    max_length tokens, stride rolling_stride (default max_length // 2), each led by the prefix token; the
    bundled perplexity documents (<= 2,000 characters) fit in one window, so that is whole-document scoring.
    Files: lm_eval_<label>.json (lm-eval's own results dict per model) and results.md (lm-eval's table per
    model plus one side-by-side table, headed by the protocol). Returns {"models": {label: {task: {metric:
    value}}}, "files": {name: path}, "markdown": the side-by-side table, "protocol": its line}; label is
    "student" (the model dir) and "teacher".
    teacher_cache_dir: keep the teacher's results there, keyed by its weights' fingerprint, the tasks, the
    limit, the local task files and the lm-eval version, so many students scored against one teacher pay
    for the teacher once.
    """
    from lm_eval.utils import make_table

    if not tasks:
        raise EvalError("no tasks given; pass --tasks (e.g. spikedistill_offline) or set evaluate.tasks")
    if Path(model_dir).exists():
        model_type_of(model_dir)  # fail fast, before lm-eval indexes tasks, if it is not a model directory
    if output_dir is None:
        from eval.leaderboard import default_eval_dir

        output_dir = default_eval_dir(model_dir)
    out_dir = Path(output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    manager = task_manager_for(tasks)
    specs = {"student": str(model_dir)} | ({"teacher": teacher_spec} if teacher_spec else {})
    models, files, md = {}, {}, []
    for label, spec in specs.items():
        if label == "teacher" and teacher_cache_dir is not None:
            raw = _cached_teacher_tasks(spec, tasks, limit, manager, batch_size, Path(teacher_cache_dir),
                                        max_length, rolling_stride)
        else:
            lm = lm_for(spec, batch_size=batch_size, max_length=max_length, rolling_stride=rolling_stride)
            raw = run_tasks(lm, tasks, limit, manager)
        path = out_dir / f"lm_eval_{label}.json"
        path.write_text(json.dumps(raw, indent=2, default=str))
        files[f"lm_eval_{label}"] = str(path)
        models[label] = summarize(raw)
        md.append(f"## {label}: {spec}\n\n{make_table(raw)}")
    protocol = rolling_protocol_text(max_length, rolling_stride)
    table = side_by_side_markdown(models)
    (out_dir / "results.md").write_text(
        f"# lm-eval results\n\nBits/byte and perplexity: {protocol}.\n\n" + table + "\n" + "\n".join(md)
    )
    files["markdown"] = str(out_dir / "results.md")
    return {"models": models, "files": files, "markdown": table, "protocol": protocol}


def _task_files_digest() -> str:
    """sha256 over the local task definitions and their data (a changed task invalidates cached scores)."""
    import hashlib

    h = hashlib.sha256()
    for path in sorted(TASKS_DIR.rglob("*")):
        if path.is_file() and path.suffix in (".yaml", ".jsonl", ".py"):
            h.update(path.relative_to(TASKS_DIR).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def _cached_teacher_tasks(spec: str, tasks: list[str], limit, manager, batch_size: int, cache_dir: Path,
                          max_length: int = DEFAULT_TASK_CONTEXT, rolling_stride: int | None = None) -> dict:
    """lm-eval results of teacher `spec` from cache_dir, or run and store them (atomically)."""
    import hashlib
    import os
    from importlib.metadata import version

    from teachers import load_teacher

    teacher = load_teacher(spec, dtype=torch.float32)
    lm = WindowedHFLM(pretrained=teacher.model.eval(), tokenizer=teacher.tokenizer, batch_size=batch_size,
                      max_length=max_length, rolling_stride=rolling_stride)
    key = {"teacher": teacher.fingerprint, "dtype": "fp32", "tasks": sorted(tasks), "limit": limit,
           "task_files": _task_files_digest(), "lm_eval": version("lm_eval"),
           "rolling": lm.rolling_protocol().as_dict()}
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = cache_dir / f"lm_eval_{name}.json"
    if path.is_file():
        try:
            return json.loads(path.read_text())
        except ValueError:
            path.unlink()  # a corrupt entry is recomputed
    raw = run_tasks(lm, tasks, limit, manager)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(raw, default=str))
    tmp.replace(path)
    return json.loads(path.read_text())
