"""One table (markdown + JSON) and two PNG plots over every run's evaluate/results.json.

The results.json format is defined here (`collect_results`) and documented in eval/README.md; the pipeline's
evaluate stage calls `collect_results` (or `evaluate_model`, which also computes everything) so the format
lives in one place.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from eval import EvalError

SCHEMA = "spikedistill.results/1"
RESULTS_FILE = Path("evaluate") / "results.json"
# what `spikedistill eval` writes into a run directory (default_eval_dir): lm-eval task scores only, merged
# into that run's row
EVAL_RESULTS_FILE = Path("eval") / "results.json"


def _model_entry(
    name: str, bpb: dict | None, tasks: dict | None, energy: dict | None, info: dict | None
) -> dict:
    return {
        "name": name,
        "info": info or {},
        "bpb": {text: dict(v) for text, v in (bpb or {}).items()},
        "tasks": {task: dict(v) for task, v in (tasks or {}).items()},
        "energy": _energy_summary(energy),
    }


def _figures(f: dict | None) -> dict:
    """compute / memory-inclusive pJ and head shares of one energy figure set (see eval/energy.py)."""
    if not f:
        return {}
    return {
        "compute_pj": f["compute_pj"],
        "memory_inclusive_pj": f["memory_inclusive_pj"],
        "head_share_compute": f["head_share_compute"],
        "head_share_memory_inclusive": f["head_share_memory_inclusive"],
    }


def _energy_summary(report: dict | None) -> dict | None:
    """The leaderboard's energy fields from an energy_report (per token), or None: the three figures (compute
    only = energy_pj, memory-inclusive, the quantised matched ANN's) with the head's share, and the break-even
    firing rates against the quantised ANN."""
    if not report:
        return None
    t = report["totals"]
    out = {
        "context_length": report["context_length"],
        "sops": t["sops"],
        "macs": t["macs"],
        "energy_pj": t["energy_pj"],
        "mean_firing_rate": t["mean_firing_rate"],
        "ratio_to_teacher": (report.get("ratio") or {}).get("energy_student_over_teacher"),
        **_figures(report.get("figures")),
        "quantised": {name: {"model": q.get("model"), **_figures(q)} for name, q in (report.get("quantised") or {}).items()},
        "break_even": report.get("break_even"),
    }
    if report.get("teacher"):
        out["teacher_energy_pj"] = report["teacher"]["energy_pj"]
        out["teacher_macs"] = report["teacher"]["macs"]
        out["teacher_figures"] = _figures(report["teacher"])
    return out


def collect_results(
    run_name: str,
    model_name: str,
    bpb: dict | None = None,
    tasks: dict | None = None,
    energy: dict | None = None,
    teacher_name: str | None = None,
    teacher_bpb: dict | None = None,
    teacher_tasks: dict | None = None,
    model_info: dict | None = None,
    sample: dict | None = None,
) -> dict:
    """Assemble a run's results.json dict (see eval/README.md).

    bpb: {text name: evaluate_bpb dict}; tasks: {task: {metric: value}} (harness.summarize output);
    energy: energy_report dict (with its teacher part when measured); sample: {"prompt", "text"} (+ "decoding":
    the evaluate stage's temperature, top_k, top_p, repetition_penalty and seed).
    """
    teacher = None
    if teacher_name:
        t_energy = None
        if energy and energy.get("teacher"):
            t_energy = {
                "context_length": energy["context_length"],
                "sops": 0.0,
                "macs": energy["teacher"]["macs"],
                "energy_pj": energy["teacher"]["energy_pj"],
                "mean_firing_rate": None,
                "ratio_to_teacher": 1.0,
                **_figures(energy["teacher"] if "compute_pj" in energy["teacher"] else None),
            }
        teacher = _model_entry(teacher_name, teacher_bpb, teacher_tasks, None, None)
        teacher["energy"] = t_energy
    return {
        "schema": SCHEMA,
        "run": run_name,
        "student": _model_entry(model_name, bpb, tasks, energy, model_info),
        "teacher": teacher,
        "sample": sample,
    }


def evaluate_model(
    model_dir,
    run_name: str,
    texts: dict[str, str],
    tasks: list[str] | None = None,
    output_dir=None,
    teacher_spec: str | None = None,
    context_length: int = 512,
    batch_size: int = 8,
    limit: int | None = None,
    energy: bool = True,
    sample_prompt: str | None = None,
    sample_tokens: int = 40,
) -> dict:
    """Everything the evaluate stage reports: bpb per text (windows of context_length, stride half of it, with
    the bootstrap interval, for student and teacher; the student's streamed pass under "stream"), lm-eval tasks, energy (three figures,
    per token and per byte), a sample; student and (when teacher_spec) teacher. Writes output_dir/results.json
    (+ lm-eval files; default `default_eval_dir(model_dir)`, never the model folder) and returns the dict."""
    from eval.bpb import BOOTSTRAP_BLOCK_BYTES, evaluate_bpb
    from eval.energy import energy_report
    from eval.generate import generate_text
    from eval.harness import evaluate_tasks
    from eval.models import can_stream, load_any, load_model_dir

    out_dir = Path(output_dir or default_eval_dir(model_dir))
    out_dir.mkdir(parents=True, exist_ok=True)
    model, tok = load_model_dir(model_dir)
    bpb = {name: evaluate_bpb(model, tok, text, context_length, batch_size, block_bytes=BOOTSTRAP_BLOCK_BYTES)
           for name, text in texts.items()}
    for name, text in texts.items():
        if can_stream(model, bpb[name]["tokens"] + 1):
            stream = evaluate_bpb(model, tok, text, context_length, batch_size, protocol="stream")
            bpb[name]["stream"] = {k: stream[k] for k in ("bits_per_byte", "nll_sum", "tokens", "protocol")}
    teacher = load_any(teacher_spec) if teacher_spec else None
    t_bpb = (
        {
            name: evaluate_bpb(teacher[0], teacher[1], text, context_length, batch_size,
                               block_bytes=BOOTSTRAP_BLOCK_BYTES)
            for name, text in texts.items()
        }
        if teacher
        else None
    )
    tasks_out = evaluate_tasks(model_dir, tasks, out_dir, limit, batch_size, teacher_spec) if tasks else {}
    task_rows = tasks_out.get("models", {})
    probe = next(iter(texts.values()), None)
    report = (
        energy_report(model, context_length, tok, probe, teacher[0] if teacher else None,
                      tokens_per_byte=tokens_per_byte(bpb),
                      teacher_tokens_per_byte=tokens_per_byte(t_bpb) if t_bpb else None)
        if energy
        else None
    )
    sample = None
    if sample_prompt:
        sample = {
            "prompt": sample_prompt,
            "text": generate_text(model, tok, sample_prompt, sample_tokens),
        }
    results = collect_results(
        run_name,
        str(model_dir),
        bpb,
        task_rows.get("student"),
        report,
        teacher_spec,
        t_bpb,
        task_rows.get("teacher"),
        model_info(model),
        sample,
    )
    first = next(iter(bpb.values()), {})
    results["settings"] = {"context_length": context_length, "bpb_protocol": first.get("protocol"),
                           "lm_eval_protocol": tasks_out.get("protocol")}
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    return results


def model_info(model) -> dict:
    """Size and shape facts shown on the leaderboard: parameters (and their split: the input embedding, the LM
    head where it is not tied to the embedding, the body = everything else), vocabulary size, mixer, time
    steps."""
    cfg = model.config
    return {
        "model_type": getattr(cfg, "model_type", ""),
        **param_split(model),
        "vocab_size": getattr(cfg, "vocab_size", None),
        "token_mixer": getattr(cfg, "token_mixer", None),
        "time_steps": getattr(cfg, "time_steps", None),
    }


def param_split(model) -> dict:
    """{"params", "params_embedding", "params_head", "params_body"}: every parameter once (tied ones counted
    in the embedding), so the three parts add up to params."""
    emb = {id(p): p.numel() for p in model.get_input_embeddings().parameters()}
    out_emb = model.get_output_embeddings()
    head = {id(p): p.numel() for p in (out_emb.parameters() if out_emb is not None else []) if id(p) not in emb}
    total = sum(p.numel() for p in model.parameters())
    n_emb, n_head = sum(emb.values()), sum(head.values())
    return {"params": total, "params_embedding": n_emb, "params_head": n_head, "params_body": total - n_emb - n_head}


def tokens_per_byte(bpb: dict | None) -> float | None:
    """Tokens per UTF-8 byte of the held-out texts a model was scored on, under its own tokenizer, pooled:
    sum of tokens / sum of bytes over its bits/byte entries ({text: evaluate_bpb dict}); None without any."""
    entries = [v for v in (bpb or {}).values() if v.get("tokens") and v.get("bytes")]
    if not entries:
        return None
    return sum(v["tokens"] for v in entries) / sum(v["bytes"] for v in entries)


def _times(value: float | None, factor: float | None) -> float | None:
    return None if value is None or factor is None else value * factor


# ---------------------------------------------------------------- rows and tables


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _short_label(entry: dict, run: str, role: str) -> str:
    """A readable model label: the teacher spec's last path part; the student's mixer, steps and size (or its
    run name when those are unknown)."""
    info = entry.get("info") or {}
    if role == "teacher":
        return Path(entry["name"].rstrip("/")).name or entry["name"]
    if not info.get("params"):
        return run
    mixer = info.get("token_mixer")
    if mixer is None:  # not a SpikeGPT student (e.g. the matched ANN baseline)
        return f"{info.get('model_type') or 'model'} {info['params'] / 1e6:.2f}M"
    mixer = "+".join(dict.fromkeys(mixer)) if isinstance(mixer, list) else mixer
    return f"{mixer} T={info.get('time_steps')} {info['params'] / 1e6:.2f}M"


def entry_row(entry: dict, run: str, role: str) -> dict:
    """A flat leaderboard row from a student/teacher entry of results.json. Energy per byte = energy per token
    x `tokens_per_byte` of the texts this model was scored on, under its own tokenizer."""
    accs = {t: m.get("acc") for t, m in entry["tasks"].items() if m.get("acc") is not None}
    task_bpb = {t: m["bits_per_byte"] for t, m in entry["tasks"].items() if m.get("bits_per_byte") is not None}
    energy = entry.get("energy") or {}
    protocols = [v["protocol"]["text"] for v in entry["bpb"].values() if isinstance(v.get("protocol"), dict)]
    info = entry.get("info") or {}
    tpb = tokens_per_byte(entry["bpb"])
    return {
        "model": entry["name"],
        "label": _short_label(entry, run, role),
        "run": run,
        "role": role,
        "bits_per_byte": {t: v["bits_per_byte"] for t, v in entry["bpb"].items()},
        "bpb_stream": {t: v["stream"]["bits_per_byte"] for t, v in entry["bpb"].items() if v.get("stream")},
        "bpb_protocol": protocols[0] if protocols else None,
        "bpb_bytes": {t: v.get("bytes") for t, v in entry["bpb"].items()},  # UTF-8 bytes scored per text
        "mean_bits_per_byte": _mean(v["bits_per_byte"] for v in entry["bpb"].values()),
        "lm_eval_bits_per_byte": task_bpb,
        "bpb_interval": {t: v.get("interval") for t, v in entry["bpb"].items()},  # 95% bootstrap (eval/bpb.py)
        "acc": accs,
        "acc_n": {t: entry["tasks"][t].get("sample_len") for t in accs},  # items scored per task
        "mean_acc": _mean(accs.values()),
        "energy_pj": energy.get("energy_pj"),
        "memory_inclusive_pj": energy.get("memory_inclusive_pj"),
        "head_share_compute": energy.get("head_share_compute"),
        "head_share_memory_inclusive": energy.get("head_share_memory_inclusive"),
        "break_even": energy.get("break_even"),
        "energy_context": energy.get("context_length"),
        "ratio_to_teacher": energy.get("ratio_to_teacher"),
        "mean_firing_rate": energy.get("mean_firing_rate"),
        "module_firing_rate": entry.get("module_firing_rate"),
        "tokens_per_byte": tpb,
        "compute_pj_per_byte": _times(energy.get("energy_pj"), tpb),
        "memory_pj_per_byte": _times(energy.get("memory_inclusive_pj"), tpb),
        "quantised_pj": {name: {k: q.get(k) for k in ("compute_pj", "memory_inclusive_pj")}
                         for name, q in (energy.get("quantised") or {}).items()},
        "vocab_size": info.get("vocab_size"),
        **{k: info.get(k) for k in ("params", "params_embedding", "params_head", "params_body")},
        "train": None,  # filled from the run directory by build_leaderboard (students only)
    }


def normalize_results(results: dict) -> dict:
    """A results.json dict in this module's schema; the evaluate stage's own layout (keys model, model_dir,
    teacher, texts {name: {student, teacher}}, tasks (evaluate_tasks output), energy, sample) is converted."""
    if results.get("schema") == SCHEMA:
        return results
    if not isinstance(results.get("texts"), dict) or "model" not in results:
        raise EvalError(
            f"results of run {results.get('run', results.get('model'))!r}: neither schema {SCHEMA!r} "
            "nor the evaluate stage's layout; re-run the evaluate stage"
        )
    texts = results["texts"]
    models = (results.get("tasks") or {}).get("models", {})
    t_bpb = {n: v["teacher"] for n, v in texts.items() if v.get("teacher")}
    has_teacher = bool(t_bpb or models.get("teacher"))
    return collect_results(
        results["model"],
        results.get("model_dir") or results["model"],
        {n: v["student"] for n, v in texts.items()},
        models.get("student"),
        results.get("energy"),
        results.get("teacher") if has_teacher else None,
        t_bpb,
        models.get("teacher"),
        results.get("model_info"),
        results.get("sample"),
    )


QUANTISED_ROLE = "quantised ANN"


def quantised_rows(results: dict) -> list[dict]:
    """Energy-only rows of the student's bit-matched quantised ANN (matched Llama, int8 and ternary); per byte
    with the student's tokens per byte (the matched ANN has the student's vocabulary)."""
    energy = results["student"].get("energy") or {}
    tpb = tokens_per_byte(results["student"]["bpb"])
    rows = []
    for name, q in (energy.get("quantised") or {}).items():
        entry = {"name": f"{q.get('model') or 'matched ANN'} {name}", "info": {}, "bpb": {}, "tasks": {},
                 "energy": {"context_length": energy.get("context_length"), "energy_pj": q["compute_pj"],
                            **q, "ratio_to_teacher": None}}
        row = entry_row(entry, results["run"], QUANTISED_ROLE)
        row["label"] = entry["name"]
        teacher_pj = energy.get("teacher_energy_pj")
        row["ratio_to_teacher"] = q["compute_pj"] / teacher_pj if teacher_pj else None
        row["tokens_per_byte"] = tpb
        row["compute_pj_per_byte"] = _times(q["compute_pj"], tpb)
        row["memory_pj_per_byte"] = _times(q["memory_inclusive_pj"], tpb)
        rows.append(row)
    return rows


def rows_of(results: dict) -> list[dict]:
    """Student row (then the teacher row and the quantised-ANN energy rows, when present) of one results.json
    dict (either layout, see normalize_results); each row carries the run's lm-eval rolling protocol."""
    results = normalize_results(results)
    rows = [entry_row(results["student"], results["run"], "student")]
    if results.get("teacher"):
        rows.append(entry_row(results["teacher"], results["run"], "teacher"))
    rows += quantised_rows(results)
    lm_eval_protocol = (results.get("settings") or {}).get("lm_eval_protocol")
    for row in rows:
        row["lm_eval_protocol"] = lm_eval_protocol
    return rows


def _cell(v, fmt="{:.4f}") -> str:
    return "" if v is None else fmt.format(v)


def _acc_cell(row: dict, task: str) -> str:
    """A task accuracy with the number of items it was scored on ("0.360 (n=300)")."""
    acc, n = row["acc"].get(task), (row.get("acc_n") or {}).get(task)
    return _cell(acc, "{:.3f}") + ("" if acc is None or n is None else f" (n={n:,.0f})")


def _rate(r: float | None) -> str:
    if r is None:
        return ""
    return "never" if r < 0 else ("any" if r > 1 else f"{r:.3f}")


def _break_even_cell(r: dict) -> str:
    """'int8 c / m; ternary c / m' break-even firing rates (compute only / memory-inclusive)."""
    be = r.get("break_even") or {}
    return "; ".join(f"{name} {_rate(v.get('compute_pj'))} / {_rate(v.get('memory_inclusive_pj'))}"
                     for name, v in be.items())


def markdown_table(rows: list[dict]) -> str:
    """Rows -> one markdown table: bits/byte per text (the shared protocol, and the student's streamed pass),
    lm-eval bits/byte, accuracy per task, the three energy figures with the head's share, ratio, firing rate,
    break-even firing rates; followed by the notes naming the protocols and the energy model."""
    texts = sorted({t for r in rows for t in r["bits_per_byte"]})
    streamed = sorted({t for r in rows for t in r.get("bpb_stream", {})})
    ppl_tasks = sorted({t for r in rows for t in r.get("lm_eval_bits_per_byte", {})})
    tasks = sorted({t for r in rows for t in r["acc"]})
    trained = any(r.get("train") for r in rows)
    neurons = any(r.get("module_firing_rate") is not None for r in rows)
    breaks = any(r.get("break_even") for r in rows)
    head = (
        ["model", "run", "role"]
        + [f"bpb {t}" for t in texts]
        + [f"bpb stream {t}" for t in streamed]
        + [f"bpb (lm-eval) {t.replace('spikedistill_', '')}" for t in ppl_tasks]
        + [f"acc {t.replace('spikedistill_', '')}" for t in tasks]
        + ["mean acc", "energy/token compute (nJ)", "memory-incl. (nJ)", "tokens/byte", "energy/byte compute (nJ)",
           "memory-incl./byte (nJ)", "head share (compute / mem.)", "vs teacher", "firing rate"]
        + (["firing rate (all neurons)"] if neurons else [])
        + (["break-even rate (compute / mem.)"] if breaks else [])
        + (["train tokens", "train tokens/s", "train bytes/s", "wall (min)"] if trained else [])
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3)]
    for r in rows:
        cells = [r["label"], r["run"], r["role"]] + [_cell(r["bits_per_byte"].get(t)) for t in texts]
        cells += [_cell(r.get("bpb_stream", {}).get(t)) for t in streamed]
        cells += [_cell(r.get("lm_eval_bits_per_byte", {}).get(t)) for t in ppl_tasks]
        cells += [_acc_cell(r, t) for t in tasks] + [_cell(r["mean_acc"], "{:.3f}")]
        shares = (r.get("head_share_compute"), r.get("head_share_memory_inclusive"))
        cells += [
            _cell(_times(r["energy_pj"], 1e-3), "{:,.2f}"),
            _cell(_times(r.get("memory_inclusive_pj"), 1e-3), "{:,.0f}"),
            _cell(r.get("tokens_per_byte")),
            _cell(_times(r.get("compute_pj_per_byte"), 1e-3), "{:,.2f}"),
            _cell(_times(r.get("memory_pj_per_byte"), 1e-3), "{:,.0f}"),
            "" if shares[0] is None else f"{shares[0]:.0%} / {shares[1]:.0%}",
            _cell(r["ratio_to_teacher"], "{:.3g}"),
            _cell(r["mean_firing_rate"]),
        ]
        if neurons:
            cells.append(_cell(r.get("module_firing_rate")))
        if breaks:
            cells.append(_break_even_cell(r))
        if trained:
            t = r.get("train") or {}
            cells += [_cell(t.get("tokens"), "{:,.0f}"), _cell(t.get("tokens_per_s"), "{:,.0f}"),
                      _cell(t.get("bytes_per_s"), "{:,.0f}"), _cell(_times(t.get("wall_seconds"), 1 / 60), "{:.1f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" + table_notes(rows)


def table_notes(rows: list[dict]) -> str:
    """The lines under a table naming its bits/byte protocols and its energy model."""
    from eval.energy import E_AC_PJ, E_INT8_MAC_PJ, E_MAC_PJ, E_TERNARY_MAC_PJ, MEMORY_MODEL

    notes = []
    protocols = sorted({r["bpb_protocol"] for r in rows if r.get("bpb_protocol")})
    if protocols:
        notes.append(f"bpb columns, student and teacher alike: {' | '.join(protocols)}.")
    if any(r.get("bpb_stream") for r in rows):
        notes.append("bpb stream: the spiking student's one pass through its recurrent state over the whole text "
                     "(no window), an extra column.")
    lm_protocols = sorted({r["lm_eval_protocol"] for r in rows if r.get("lm_eval_protocol")})
    if lm_protocols and any(r.get("lm_eval_bits_per_byte") for r in rows):
        notes.append(f"bpb (lm-eval): {' | '.join(lm_protocols)}.")
    contexts = sorted({r["energy_context"] for r in rows if r.get("energy_context")})
    if contexts:
        notes.append(
            f"Energy per token at context {', '.join(map(str, contexts))} (45 nm, Horowitz ISSCC 2014): compute "
            f"only prices an op on spikes as an accumulate ({E_AC_PJ} pJ x firing rate) and every other op as a "
            f"MAC ({E_MAC_PJ} pJ); memory-incl. adds memory traffic ({MEMORY_MODEL}); the {QUANTISED_ROLE} rows "
            f"are the student's matched Llama with int8 ({E_INT8_MAC_PJ:g} pJ per MAC) or ternary "
            f"({E_TERNARY_MAC_PJ:g} pJ) weights; head share: the LM head's part of each figure."
        )
    if any(r.get("tokens_per_byte") for r in rows):
        notes.append("tokens/byte: tokens per UTF-8 byte of the held-out texts under the model's own tokenizer "
                     "(sum of tokens / sum of bytes over the bpb texts); energy per byte = energy per token x "
                     "tokens/byte (a quantised ANN row: its student's), so vocabularies compare on the same text.")
    if any(r.get("acc_n") for r in rows):
        notes.append("acc (n=N): the accuracy over the N items scored (lm-eval's sample count; `--limit` lowers it).")
    if any((r.get("train") or {}).get("bytes_per_s") for r in rows):
        notes.append("train bytes/s: training text bytes per second of training-step time = train tokens/s / the "
                     "training data's tokens per byte (prepare's bytes_per_token, inverted).")
    if any(r.get("break_even") for r in rows):
        notes.append("break-even rate: the firing rate of every spike operand at which the student would cost "
                     "as much as the int8 / ternary ANN (compute only / memory-incl.); it wins below it, "
                     "'never' = its rate-independent part alone costs more.")
    return ("\n" + "\n".join(notes) + "\n") if notes else ""


def model_card_row(results: dict) -> str:
    """The run's rows (student, and teacher if scored) as a markdown table for the exported model card."""
    return markdown_table(rows_of(results))


# ---------------------------------------------------------------- leaderboard


def default_eval_dir(model_dir) -> Path:
    """Where `spikedistill eval` (and `evaluate_model`) write when no output folder is given: never the model
    folder, which is what a user shares. A pipeline run's exported model (<run>/export/model beside
    <run>/config.yaml) -> <run>/eval; any other model (a folder or a teacher spec) -> runs/<its last path
    part>/eval under the working directory. Either way `spikedistill leaderboard` of the runs folder shows it.
    Raises EvalError when runs/<name> is a pipeline run (it has a config.yaml) of another model."""
    path = Path(model_dir)
    resolved = path.resolve()
    if resolved.parent.name == "export" and (resolved.parent.parent / "config.yaml").is_file():
        return resolved.parent.parent / "eval"
    run = Path("runs") / (path.name or resolved.name)
    if (run / "config.yaml").is_file():
        raise EvalError(f"{run} is a pipeline run of another model, not {model_dir}; pass --output DIR")
    return run / "eval"


def write_task_results(out_dir, model_dir, tasks_out: dict, teacher_spec: str | None = None) -> Path:
    """out_dir/results.json (this module's schema, lm-eval tasks only) from an `evaluate_tasks` result, with
    the run named after out_dir's parent (<run>/eval -> <run>), so the leaderboard merges it into that run."""
    models = tasks_out["models"]
    results = collect_results(Path(out_dir).resolve().parent.name, str(model_dir), tasks=models.get("student"),
                              teacher_name=teacher_spec, teacher_tasks=models.get("teacher"))
    results["settings"] = {"lm_eval_protocol": tasks_out.get("protocol")}
    path = Path(out_dir) / "results.json"
    path.write_text(json.dumps(results, indent=2))
    return path


def load_runs(runs_dir) -> list[dict]:
    """Every run's results under runs_dir (see _run_results), sorted by run name."""
    return [res for _, res in _run_results(runs_dir)]


def _run_results(runs_dir) -> list[tuple[Path, dict]]:
    """(run directory, results) of every run under runs_dir that has <run>/evaluate/results.json (the evaluate
    stage) or <run>/eval/results.json (`spikedistill eval`), sorted by run name; with both, the second's task
    scores are merged into the first (`_merged`)."""
    root = Path(runs_dir)
    if not root.is_dir():
        raise EvalError(f"{runs_dir}: not a directory; pass the runs folder (e.g. runs/)")
    found = sorted({p.parent.parent for name in (RESULTS_FILE, EVAL_RESULTS_FILE) for p in root.glob(f"*/{name}")})
    if not found:
        raise EvalError(f"{runs_dir}: no */{RESULTS_FILE} or */{EVAL_RESULTS_FILE} found; run the evaluate stage "
                        "or `spikedistill eval` first")
    return [(run_dir, _merged(run_dir)) for run_dir in found]


def _read_results(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return normalize_results(json.loads(path.read_text()))
    except json.JSONDecodeError as exc:
        raise EvalError(f"{path}: unreadable JSON ({exc.msg}); re-run what wrote it") from exc


def _merged(run_dir: Path) -> dict:
    """The evaluate stage's results of a run with `spikedistill eval`'s task scores added (they replace the
    stage's for a task both scored); the teacher's only when both name the same teacher."""
    stage, extra = _read_results(run_dir / RESULTS_FILE), _read_results(run_dir / EVAL_RESULTS_FILE)
    if stage is None or extra is None:
        return stage or extra
    stage["student"]["tasks"].update(extra["student"]["tasks"])
    teacher = extra.get("teacher")
    if teacher and stage.get("teacher") is None:
        stage["teacher"] = teacher
    elif teacher and stage["teacher"]["name"] == teacher["name"]:
        stage["teacher"]["tasks"].update(teacher["tasks"])
    settings = stage.setdefault("settings", {})
    settings["lm_eval_protocol"] = (extra.get("settings") or {}).get("lm_eval_protocol") or settings.get("lm_eval_protocol")
    return stage


def _dedup_teachers(rows: list[dict]) -> list[dict]:
    """Keep one row per teacher (and quantised ANN) name, the first run's, so a model shared by many runs
    appears once."""
    seen, out = set(), []
    for r in rows:
        key = (r["role"], r["model"]) if r["role"] != "student" else (r["run"], r["role"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def build_leaderboard(runs_dir, out_dir, only: set[str] | None = None) -> dict:
    """Aggregate all runs (or only the run directory names in `only`) into out_dir/{leaderboard.md,
    leaderboard.json, bpb_vs_energy.png, task_accuracy.png (when a run scored a task), learning_curves.png,
    token_efficiency.png};
    returns {"rows": [...], "files": {...}}.

    Student rows also carry their run's training cost and validation curve (`training_info`)."""
    all_rows = []
    for run_dir, res in _run_results(runs_dir):
        if only is not None and run_dir.name not in only:
            continue
        for row in rows_of(res):
            if row["role"] == "student":
                row["train"] = training_info(run_dir)
            all_rows.append(row)
    rows = _dedup_teachers(all_rows)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "markdown": out / "leaderboard.md",
        "json": out / "leaderboard.json",
        "bpb_vs_energy": out / "bpb_vs_energy.png",
        "task_accuracy": out / "task_accuracy.png",
        "learning_curves": out / "learning_curves.png",
        "token_efficiency": out / "token_efficiency.png",
    }
    files["markdown"].write_text("# spikedistill leaderboard\n\n" + markdown_table(rows))
    files["json"].write_text(json.dumps({"schema": SCHEMA, "rows": rows}, indent=2))
    plot_bpb_vs_energy(rows, files["bpb_vs_energy"])
    if any(r["acc"] for r in rows):
        plot_task_accuracy([r for r in rows if r["role"] != QUANTISED_ROLE], files["task_accuracy"])
    else:  # no run scored a task: no empty chart, and none left over from an earlier report
        files.pop("task_accuracy").unlink(missing_ok=True)
    plot_learning_curves(rows, files["learning_curves"])
    plot_token_efficiency(rows, files["token_efficiency"])
    return {"rows": rows, "files": {k: str(v) for k, v in files.items()}}


# ---------------------------------------------------------------- training cost and curves

TRAINING_STAGES = ("align", "distill")
# keys that set a run's budget or bookkeeping, not what is trained: runs differing only here are one series
_BUDGET_KEYS = ("steps", "eval_every", "eval_batches", "checkpoint_every", "keep_checkpoints", "log_every")
# and its schedule, which each budget gets its own of (a study sweeps the learning rate per arm and budget)
_SCHEDULE_KEYS = ("warmup_steps", "lr", "min_lr")


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return obj if isinstance(obj, dict) else {}


def series_key(config: dict) -> str:
    """A run's resolved config.yaml minus its name, budget, schedule, evaluation and study settings (see
    _BUDGET_KEYS and _SCHEDULE_KEYS)."""
    import hashlib

    cfg = json.loads(json.dumps(config, default=str))
    cfg.pop("run", None)
    cfg.pop("evaluate", None)
    cfg.pop("study", None)  # read by `spikedistill study` only (seeds, the learning-rate grid)
    for stage in TRAINING_STAGES:
        train = (cfg.get(stage) or {}).get("train") or {}
        for key in _BUDGET_KEYS:
            train.pop(key, None)
        for key in _SCHEDULE_KEYS:
            (train.get("optim") or {}).pop(key, None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:12]


def training_info(run_dir) -> dict | None:
    """Training tokens, tokens/s, bytes/s, seconds, the final validation bits/byte and the validation curve of a
    run directory (None without distill).

    From <run>/<stage>/done.json (stage seconds; the trainer's tokens_seen, train_seconds and final
    val_bits_per_byte; prepare's bytes_per_token) and <run>/distill/metrics.jsonl (val_bits_per_byte by tokens
    seen, align's tokens counted first). tokens_per_byte is the training data's (text tokens / UTF-8 bytes of
    the documents prepare read, under the run's tokenizer); bytes_per_s = tokens_per_s / tokens_per_byte.
    wall_seconds sums every stage's own time, so a shared teacher cache counts only in the run that built it;
    a stage's time is its done.json `wall_seconds` (every attempt: a run interrupted and resumed counts
    each invocation), or `seconds` (the last attempt) in run directories written before that field.
    """
    import yaml

    run_dir = Path(run_dir)
    done = {p.parent.name: _read_json(p) for p in sorted(run_dir.glob("*/done.json"))}
    if "distill" not in done:
        return None
    metrics = {s: done.get(s, {}).get("metrics", {}) for s in TRAINING_STAGES}
    align_tokens = float(metrics["align"].get("tokens_seen") or 0.0)
    tokens = align_tokens + float(metrics["distill"].get("tokens_seen") or 0.0)
    train_seconds = sum(float(metrics[s].get("train_seconds") or 0.0) for s in TRAINING_STAGES)
    curve = []
    log = run_dir / "distill" / "metrics.jsonl"
    if log.is_file():
        for line in log.read_text().splitlines():
            row = json.loads(line)
            if row.get("split") == "val" and "val_bits_per_byte" in row and "tokens_seen" in row:
                curve.append([align_tokens + row["tokens_seen"], row["val_bits_per_byte"]])
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        config = {}
    tokens_per_s = tokens / train_seconds if tokens and train_seconds else None
    bytes_per_token = float(done.get("prepare", {}).get("metrics", {}).get("bytes_per_token") or 0.0) or None
    val_bpb = metrics["distill"].get("val_bits_per_byte")
    return {
        "tokens": tokens or None,
        "align_tokens": align_tokens,
        "train_seconds": train_seconds or None,
        "tokens_per_s": tokens_per_s,
        "tokens_per_byte": 1 / bytes_per_token if bytes_per_token else None,
        "bytes_per_s": _times(tokens_per_s, bytes_per_token),
        "val_bpb": val_bpb if val_bpb is not None else (curve[-1][1] if curve else None),
        "wall_seconds": sum(_stage_seconds(d) for d in done.values()),
        "stage_seconds": {name: _stage_seconds(d) for name, d in done.items()},
        "curve": curve,
        "series": series_key(config) if config else None,
    }


def _stage_seconds(done: dict) -> float:
    """Wall seconds of one stage over all its attempts (see training_info)."""
    return float(done.get("wall_seconds") or done.get("seconds") or 0.0)


def plot_learning_curves(rows: list[dict], path) -> None:
    """Validation bits/byte against training tokens seen (align + distill), one line per student run."""
    fig, ax = _axes((7, 4.5))
    drawn = 0
    for r in rows:
        curve = (r.get("train") or {}).get("curve") or []
        if curve:
            xs, ys = zip(*curve)
            ax.plot(xs, ys, marker=".", label=_label(r))
            drawn += 1
    if drawn:
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no run logged validation bits/byte", ha="center", transform=ax.transAxes)
    ax.set_xlabel("training tokens seen (align + distill)")
    ax.set_ylabel("validation bits per byte")
    ax.set_title("Learning curves")
    _save(fig, path)


def plot_token_efficiency(rows: list[dict], path) -> None:
    """Held-out bits/byte against training tokens; runs that differ only in budget are joined by a line."""
    series: dict[str, list[dict]] = {}
    for r in rows:
        t = r.get("train") or {}
        if t.get("tokens") and r["mean_bits_per_byte"] is not None:
            series.setdefault(t.get("series") or r["run"], []).append(r)
    fig, ax = _axes((7, 4.5))
    for members in series.values():
        members.sort(key=lambda r: r["train"]["tokens"])
        xs = [r["train"]["tokens"] for r in members]
        ys = [r["mean_bits_per_byte"] for r in members]
        ax.plot(xs, ys, marker="o", label=" / ".join(_label(r) for r in members))
    if series:
        ax.set_xscale("log")
        ax.legend(fontsize=7)
    else:
        ax.text(0.5, 0.5, "no run has both training tokens and bits/byte", ha="center", transform=ax.transAxes)
    ax.set_xlabel("training tokens (align + distill, log)")
    ax.set_ylabel("held-out bits per byte (mean over texts)")
    ax.set_title("Token efficiency")
    _save(fig, path)


def _axes(size: tuple[float, float]):
    """A new (figure, axes) on matplotlib's file-only Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=size)


def _save(fig, path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _label(r: dict) -> str:
    return r["label"] if r["role"] == "teacher" else r["run"]


def common_texts(rows: list[dict]) -> tuple[list[str], list[dict], list[dict]]:
    """The held-out texts that every row was scored on, with the same number of bytes.

    Returns (texts, rows kept, rows left out). A text counts only when every kept row has it with one byte
    count (e.g. all cut at evaluate.max_text_bytes=20000). When no text is shared by all rows, the
    (text, bytes) pair scored by the most rows is used and the rows without it are left out.
    """
    keys = [{(t, r.get("bpb_bytes", {}).get(t)) for t in r["bits_per_byte"]} for r in rows]
    if not rows:
        return [], [], []
    shared = set.intersection(*keys)
    if shared:
        return sorted(t for t, _ in shared), rows, []
    counts: dict = {}
    for ks in keys:
        for k in ks:
            counts[k] = counts.get(k, 0) + 1
    if not counts:
        return [], [], rows
    best = max(sorted(counts, key=str), key=lambda k: counts[k])
    kept = [r for r, ks in zip(rows, keys) if best in ks]
    return [best[0]], kept, [r for r, ks in zip(rows, keys) if best not in ks]


def _text_label(rows: list[dict], texts: list[str]) -> str:
    sizes = {rows[0].get("bpb_bytes", {}).get(t) for t in texts} if rows else set()
    size = f", {sizes.pop():,} bytes each" if len(sizes) == 1 and None not in sizes else ""
    return ", ".join(texts) + size


def plot_bpb_vs_energy(rows: list[dict], path) -> None:
    """Scatter: bits/byte (lower is better) against compute energy per byte of held-out text (log scale; per
    token when a plotted model lacks its tokens per byte), so models with different vocabularies compare.

    Every point's bits/byte is the mean over the same texts (`common_texts`: the texts all plotted runs
    were scored on, with the same byte counts); the texts are named on the plot, and runs left out for
    lack of them are listed under it.
    """
    fig, ax = _axes((6.4, 4.8))
    candidates = [r for r in rows if r["energy_pj"] and r["bits_per_byte"]]
    texts, pts, left_out = common_texts(candidates)
    per_byte = bool(pts) and all(r.get("compute_pj_per_byte") for r in pts)
    for r in pts:
        x = (r["compute_pj_per_byte"] if per_byte else r["energy_pj"]) / 1e3
        y = sum(r["bits_per_byte"][t] for t in texts) / len(texts)
        marker, color = ("s", "tab:red") if r["role"] == "teacher" else ("o", "tab:blue")
        ax.scatter(x, y, marker=marker, color=color)
        ax.annotate(_label(r), (x, y), fontsize=8, xytext=(4, 4), textcoords="offset points")
    if not pts:
        ax.text(0.5, 0.5, "no run has both bits/byte and energy", ha="center", transform=ax.transAxes)
    else:
        ax.set_xscale("log")
    ax.set_xlabel(f"compute energy per {'byte' if per_byte else 'token'} (nJ, log; memory traffic not counted)")
    ax.set_ylabel("bits per byte (mean over the texts named above)")
    ax.set_title(f"Students (o) and teachers (s)\nbits/byte on the same texts for every point: "
                 f"{_text_label(pts, texts) or 'none'}", fontsize=9)
    if left_out:
        names = ", ".join(sorted({_label(r) for r in left_out}))
        fig.text(0.01, 0.01, f"left out (not scored on these texts): {names}", fontsize=7)
    _save(fig, path)


def plot_task_accuracy(rows: list[dict], path) -> None:
    """Grouped bars: accuracy per task, one bar per model."""
    tasks = sorted({t for r in rows for t in r["acc"]})
    fig, ax = _axes((max(6, 1.6 * len(tasks) + 2), 4.5))
    width = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        xs = [j + i * width for j in range(len(tasks))]
        ax.bar(xs, [r["acc"].get(t, math.nan) for t in tasks], width, label=_label(r))
    if not tasks:
        ax.text(0.5, 0.5, "no task accuracies in these runs", ha="center", transform=ax.transAxes)
    ax.set_xticks(
        [j + 0.4 - width / 2 for j in range(len(tasks))],
        [t.replace("spikedistill_", "") for t in tasks],
        rotation=20,
        ha="right",
        fontsize=8,
    )
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    _save(fig, path)
