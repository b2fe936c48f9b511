"""Stage evaluate: score the exported student (and its teacher) and write results.json.

Bits/byte on each of `evaluate.texts` (the first `max_text_bytes` of each), lm-eval tasks when listed, the
energy report, a greedy sample. The teacher's bits/byte are cached under $SPIKEDISTILL_CACHE (default
~/.cache/spikedistill) keyed by teacher fingerprint, text and context, so reruns only score the student.
Output: {"results": results.json}; the exported model card is rewritten with the metrics.
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
    from eval.bpb import read_eval_text

    limit = recipe.evaluate.max_text_bytes
    texts = {}
    for name in recipe.evaluate.texts:
        text = read_eval_text(name)
        if limit and len(text.encode("utf-8")) > limit:
            head = text.encode("utf-8")[:limit].decode("utf-8", errors="ignore")
            cut = head.rfind("\n")
            text = head[: cut + 1] if cut > 0 else head
        texts[Path(name).name] = text
    return texts


def _teacher_scores(recipe: Recipe, texts: dict[str, str], log) -> tuple[dict[str, dict], Any]:
    """Teacher bits/byte per text (cached) and the loaded teacher."""
    from eval.bpb import evaluate_bpb
    from teachers import load_teacher

    e = recipe.evaluate
    teacher = load_teacher(recipe.teacher.spec, dtype=teacher_dtype(recipe.teacher.dtype),
                           trust_remote_code=recipe.teacher.trust_remote_code)
    scores = {}
    for name, text in texts.items():
        key = stable_hash({"teacher": teacher.fingerprint, "dtype": recipe.teacher.dtype,
                           "text": hashlib.sha256(text.encode("utf-8")).hexdigest(), "context": e.context_length})
        path = score_cache_dir() / f"{key}.json"
        if path.is_file():
            scores[name] = json.loads(path.read_text())
            log.info("teacher bits/byte on %s: cached (%s)", name, path)
            continue
        scores[name] = evaluate_bpb(teacher.model, teacher.tokenizer, text, e.context_length, e.batch_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}")
        tmp.write_text(json.dumps(scores[name]))
        tmp.replace(path)
    return scores, teacher


def _sample(model, tokenizer, prompt: str, n_tokens: int) -> str:
    import torch

    ids = tokenizer(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n_tokens, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def _firing_rate(model, tokenizer, text: str, context_length: int) -> float:
    """Mean firing rate over the student's spiking modules on the first context of `text`."""
    import torch

    ids = tokenizer(text, return_tensors="pt").input_ids[:, :context_length]
    with torch.no_grad():
        model(ids)
    rates = model.spike_rates()
    return sum(rates.values()) / max(len(rates), 1)


def results_table(results: dict) -> str:
    """Markdown table: per text, student vs teacher bits/byte; then firing rate and energy ratio."""
    lines = ["| text | student bits/byte | teacher bits/byte |", "|---|---|---|"]
    for name, row in results["bits_per_byte"].items():
        teacher = row.get("teacher")
        lines.append(f"| {name} | {row['student']:.4f} | {'-' if teacher is None else f'{teacher:.4f}'} |")
    lines.append("")
    lines.append(f"firing rate (mean over spiking layers): {results['firing_rate']:.4f}")
    ratio = results.get("energy_ratio")
    if ratio is not None:
        lines.append(f"energy per token vs teacher: {ratio:.4g} (operations only, 45 nm; memory not counted)")
    return "\n".join(lines)


def _energy(model, tokenizer, text: str, context_length: int, teacher) -> tuple[dict, float | None, str]:
    from eval.energy import energy_report, format_energy_table

    report = energy_report(model, context_length, tokenizer=tokenizer, text=text,
                           teacher_config=teacher.config if teacher is not None else None)
    ratio = report.get("ratio_to_teacher", report.get("energy_ratio"))
    return report, ratio, format_energy_table(report)


def run(ctx: StageContext) -> StageResult:
    """Score the exported student; write results.json; rewrite the model card; print the table."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import students  # noqa: F401  (registers spikegpt with AutoModelForCausalLM)
    from eval.bpb import evaluate_bpb

    r, e = ctx.recipe, ctx.recipe.evaluate
    model_dir = ctx.upstream["export"]["outputs"]["model"]
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    texts = load_texts(r)
    student = {n: evaluate_bpb(model, tokenizer, t, e.context_length, e.batch_size) for n, t in texts.items()}
    teacher_scores, teacher = _teacher_scores(r, texts, ctx.log) if e.teacher else ({}, None)
    first_text = next(iter(texts.values()))
    results: dict[str, Any] = {
        "model": r.run.name, "model_dir": model_dir, "teacher": r.teacher.spec,
        "teacher_fingerprint": getattr(teacher, "fingerprint", None), "context_length": e.context_length,
        "max_text_bytes": e.max_text_bytes,
        "bits_per_byte": {n: {"student": student[n]["bits_per_byte"],
                              "teacher": teacher_scores.get(n, {}).get("bits_per_byte")} for n in texts},
        "texts": {n: {"student": student[n], "teacher": teacher_scores.get(n)} for n in texts},
        "firing_rate": _firing_rate(model, tokenizer, first_text, e.context_length),
    }
    energy_text = ""
    if e.energy:
        results["energy"], results["energy_ratio"], energy_text = _energy(
            model, tokenizer, first_text, e.context_length, teacher)
    if e.tasks:
        from eval.harness import evaluate_tasks

        results["tasks"] = evaluate_tasks(model_dir, list(e.tasks), ctx.stage_dir / "lm_eval", limit=e.limit,
                                          batch_size=e.batch_size, teacher_spec=r.teacher.spec if e.teacher else None)
    results["sample"] = {"prompt": e.sample_prompt,
                         "text": _sample(model, tokenizer, e.sample_prompt, e.sample_tokens)}
    out = ctx.stage_dir / "results.json"
    out.write_text(json.dumps(results, indent=2, default=str), encoding="utf-8")
    table = results_table(results)
    write_model_card(Path(model_dir), r, ctx.upstream["export"]["metrics"].get("parameters", 0),
                     _card_metrics(results), extra="\n" + table + "\n")
    print(("\n" + energy_text if energy_text else "") + "\n" + table)
    print(f"\nsample: {e.sample_prompt}{results['sample']['text']}\n")
    return StageResult(outputs={"results": str(out)}, metrics=_card_metrics(results))


def _card_metrics(results: dict) -> dict[str, float]:
    out: dict[str, float] = {}
    for name, row in results["bits_per_byte"].items():
        out[f"bpb_{name}"] = row["student"]
        if row["teacher"] is not None:
            out[f"teacher_bpb_{name}"] = row["teacher"]
    out["firing_rate"] = results["firing_rate"]
    if results.get("energy_ratio") is not None:
        out["energy_ratio"] = results["energy_ratio"]
    return out
