"""Stage evaluate: score the exported student (and its teacher) and write results.json.

Bits/byte on each of `evaluate.texts` (the first `max_text_bytes` of each) under one protocol for student and
teacher (windows of `evaluate.context_length` tokens, stride half of it, each window led by the prefix token:
eval/scoring.py), each with a 95% bootstrap interval over 4 KiB blocks of the text (eval/bpb.py), plus the
student's streamed figure as an extra column; lm-eval tasks when listed (rolling
documents under one windows protocol for both); the energy report (compute only, memory-inclusive, the
quantised matched ANN); a greedy sample. The teacher's bits/byte and energy entry are cached under
$SPIKEDISTILL_CACHE (default ~/.cache/spikedistill) keyed by teacher fingerprint, text, protocol and context,
so reruns only score the student. Output: {"results": results.json}; the exported model card is rewritten
with the metrics.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from pipeline.recipe import stable_hash
from pipeline.schema import Recipe
from pipeline.stages import StageContext, StageResult
from pipeline.stages.export import write_model_card
from pipeline.stages.teacher_cache import teacher_dtype


def score_cache_dir() -> Path:
    """Where teacher scores are cached across runs."""
    root = os.environ.get("SPIKEDISTILL_CACHE") or Path.home() / ".cache" / "spikedistill"
    return Path(root) / "teacher_scores"


def load_texts(recipe: Recipe) -> dict[str, str]:
    """name -> text (bundled name or file path), cut to `evaluate.max_text_bytes` at a line end."""
    from eval.bpb import cut_text, read_eval_text

    return {Path(name).name: cut_text(read_eval_text(name), recipe.evaluate.max_text_bytes)
            for name in recipe.evaluate.texts}


SCORE_CACHE_VERSION = 3  # 2: one windows protocol with a BOS-led window, graph-counted energy; 3: bootstrap interval


def _cached(key: dict, compute, log, what: str) -> dict:
    """A JSON result from the teacher score cache, or compute it and store it atomically."""
    path = score_cache_dir() / f"{stable_hash(key | {'version': SCORE_CACHE_VERSION})}.json"
    if path.is_file():
        try:
            value = json.loads(path.read_text())
            log.info("teacher %s: cached (%s)", what, path)
            return value
        except ValueError:
            path.unlink()  # a corrupt entry is recomputed
    value = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(json.dumps(value))
    tmp.replace(path)
    return value


def _teacher_scores(recipe: Recipe, texts: dict[str, str], log) -> tuple[dict[str, dict], Any]:
    """Teacher bits/byte per text (cached; the same windows protocol as the student) and the loaded teacher."""
    from eval.bpb import BOOTSTRAP_BLOCK_BYTES, evaluate_bpb
    from teachers import load_teacher

    e = recipe.evaluate
    teacher = load_teacher(recipe.teacher.spec, dtype=teacher_dtype(recipe.teacher.dtype),
                           trust_remote_code=recipe.teacher.trust_remote_code)
    scores = {}
    for name, text in texts.items():
        key = {"teacher": teacher.fingerprint, "dtype": recipe.teacher.dtype,
               "text": hashlib.sha256(text.encode("utf-8")).hexdigest(), "context": e.context_length,
               "stride": bpb_stride(e.context_length), "interval": _interval_settings()}
        scores[name] = _cached(
            key,
            lambda text=text: evaluate_bpb(teacher.model, teacher.tokenizer, text, e.context_length, e.batch_size,
                                           stride=bpb_stride(e.context_length), block_bytes=BOOTSTRAP_BLOCK_BYTES),
            log, f"bits/byte on {name}",
        )
    return scores, teacher


def _interval_settings() -> dict:
    """What the bootstrap interval of a cached teacher score depends on (eval/bpb.py)."""
    from eval.bpb import BOOTSTRAP_BLOCK_BYTES, BOOTSTRAP_LEVEL, BOOTSTRAP_REPLICATES

    return {"block_bytes": BOOTSTRAP_BLOCK_BYTES, "replicates": BOOTSTRAP_REPLICATES, "level": BOOTSTRAP_LEVEL}


def bpb_stride(context_length: int) -> int:
    """The stride of the bits/byte windows: half the context, so every scored token after the first window
    sees at least half a window of text."""
    return max(1, context_length // 2)


def _student_scores(model, tokenizer, texts: dict[str, str], e) -> dict[str, dict]:
    """Student bits/byte per text in the table's windows protocol, with its streamed figure under "stream" when
    evaluate.stream is on and the student can stream."""
    from eval.bpb import BOOTSTRAP_BLOCK_BYTES, evaluate_bpb
    from eval.models import can_stream

    scores = {}
    for name, text in texts.items():
        row = evaluate_bpb(model, tokenizer, text, e.context_length, e.batch_size, stride=bpb_stride(e.context_length),
                           block_bytes=BOOTSTRAP_BLOCK_BYTES)
        if e.stream and can_stream(model, row["tokens"] + 1):
            stream = evaluate_bpb(model, tokenizer, text, e.context_length, e.batch_size, protocol="stream")
            row["stream"] = {k: stream[k] for k in ("bits_per_byte", "nll_sum", "tokens", "protocol")}
        scores[name] = row
    return scores


def _sample(model, tokenizer, e, seed: int) -> dict | None:
    """The generated sample and how it was decoded (evaluate.sample_*; sampling seeded by run.seed); None when
    evaluate.sample_tokens is 0."""
    from eval.generate import generate_text

    if e.sample_tokens == 0:
        return None
    settings = {"temperature": e.sample_temperature, "top_k": e.sample_top_k, "top_p": e.sample_top_p,
                "repetition_penalty": e.sample_repetition_penalty,
                "seed": seed if e.sample_temperature > 0 else None}
    text = generate_text(model, tokenizer, e.sample_prompt, e.sample_tokens, e.sample_temperature, e.sample_top_k,
                         e.sample_top_p, settings["seed"], repetition_penalty=e.sample_repetition_penalty)
    return {"prompt": e.sample_prompt, "text": text, "decoding": settings}


def _firing_rate(model, tokenizer, text: str, context_length: int) -> float:
    """Mean firing rate over the student's spiking modules on the first context of `text`."""
    import torch

    ids = tokenizer(text, return_tensors="pt").input_ids[:, :context_length]
    with torch.no_grad():
        model(ids)
    rates = model.spike_rates()
    return sum(rates.values()) / max(len(rates), 1)


def _energy(model, tokenizer, text: str, context_length: int, teacher, log, bpb: dict,
            teacher_bpb: dict | None) -> tuple[dict, str]:
    """The energy report; per byte with the tokens per byte of the scored held-out texts (eval/README.md)."""
    from eval.energy import energy_report, format_energy_table, teacher_energy
    from eval.leaderboard import tokens_per_byte

    entry = None
    if teacher is not None:
        key = {"teacher": teacher.fingerprint, "energy_context": context_length}
        entry = _cached(key, lambda: teacher_energy(teacher.model, context_length), log, "energy")
    report = energy_report(model, context_length, tokenizer=tokenizer, text=text, teacher_entry=entry,
                           tokens_per_byte=tokens_per_byte(bpb),
                           teacher_tokens_per_byte=tokens_per_byte(teacher_bpb) if teacher_bpb else None)
    return report, format_energy_table(report)


def headline(results: dict) -> dict[str, float]:
    """The scalar metrics of results.json kept in done.json: bits/byte per text, firing rate, energy ratio."""
    out: dict[str, float] = {}
    student, teacher = results["student"], results.get("teacher") or {}
    for name, row in student["bpb"].items():
        out[f"bpb_{name}"] = row["bits_per_byte"]
        if "stream" in row:
            out[f"bpb_stream_{name}"] = row["stream"]["bits_per_byte"]
        if name in teacher.get("bpb", {}):
            out[f"teacher_bpb_{name}"] = teacher["bpb"][name]["bits_per_byte"]
    energy = student.get("energy") or {}
    for key, name in (("mean_firing_rate", "firing_rate"), ("ratio_to_teacher", "energy_ratio")):
        if energy.get(key) is not None:
            out[name] = energy[key]
    return out


def run(ctx: StageContext) -> StageResult:
    """Score the exported student; write results.json; rewrite the model card; print the table."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import students  # noqa: F401  (registers spikegpt with AutoModelForCausalLM)
    from eval.leaderboard import collect_results, model_card_row, model_info

    r, e = ctx.recipe, ctx.recipe.evaluate
    model_dir = ctx.upstream["export"]["outputs"]["model"]
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = load_texts(r)
    bpb = _student_scores(model, tokenizer, texts, e)
    teacher_bpb, teacher = _teacher_scores(r, texts, ctx.log) if e.teacher else (None, None)
    first_text = next(iter(texts.values()))
    report, energy_text = (
        _energy(model, tokenizer, first_text, e.context_length, teacher, ctx.log, bpb, teacher_bpb)
        if e.energy else (None, "")
    )
    task_rows: dict = {}
    lm_eval_protocol = None
    if e.tasks:
        from eval.harness import evaluate_tasks

        tasks_out = evaluate_tasks(model_dir, list(e.tasks), ctx.stage_dir / "lm_eval", limit=e.limit,
                                   batch_size=e.batch_size,
                                   teacher_spec=r.teacher.spec if e.teacher else None,
                                   teacher_cache_dir=score_cache_dir())
        task_rows, lm_eval_protocol = tasks_out["models"], tasks_out["protocol"]
    sample = _sample(model, tokenizer, e, r.run.seed)
    results = collect_results(r.run.name, model_dir, bpb, task_rows.get("student"), report,
                              r.teacher.spec if e.teacher else None, teacher_bpb, task_rows.get("teacher"),
                              model_info(model), sample)
    if hasattr(model, "spike_rates"):  # every spiking module's rate, also where no Linear reads spikes
        results["student"]["module_firing_rate"] = _firing_rate(model, tokenizer, first_text, e.context_length)
    from eval.scoring import Protocol

    results["settings"] = {"context_length": e.context_length, "max_text_bytes": e.max_text_bytes,
                           "teacher_fingerprint": getattr(teacher, "fingerprint", None),
                           "bpb_protocol": Protocol("windows", e.context_length,
                                                    bpb_stride(e.context_length)).as_dict(),
                           "lm_eval_protocol": lm_eval_protocol}
    out = ctx.stage_dir / "results.json"
    out.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    table = model_card_row(results)
    metrics = headline(results)
    if report is None and "module_firing_rate" in results["student"]:
        # without the energy report, the plain mean firing rate stands in
        metrics["firing_rate"] = results["student"]["module_firing_rate"]
        table += f"\nfiring rate (mean over spiking modules): {metrics['firing_rate']:.4f}\n"
    write_model_card(Path(model_dir), r, ctx.upstream["export"]["metrics"].get("parameters", 0), metrics,
                     extra="\n" + table + "\n")
    if energy_text:  # the per-layer table goes to a file; the console gets the totals and the three figures
        (ctx.stage_dir / "energy.md").write_text(energy_text, encoding="utf-8")
        print("\n" + energy_text[energy_text.index("Totals per token"):].strip())
    print("\n" + table)
    if sample is not None:
        how = sample["decoding"]
        mode = "greedy" if how["temperature"] == 0 else f"temperature {how['temperature']}, seed {how['seed']}"
        if how["repetition_penalty"] != 1.0:
            mode += f", repetition penalty {how['repetition_penalty']}"
        print(f"\nsample: {e.sample_prompt}{sample['text']}\n({mode})\n")
    return StageResult(outputs={"results": str(out)}, metrics=metrics)
