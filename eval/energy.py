"""Energy per token: the student's SOPs and MACs from its own op counts, against the teacher's all-MAC FLOPs.

Convention (REFERENCES §3): an op is an accumulate (AC, E_AC pJ) only when one operand is a {0,1} spike
tensor, and then counts as ops x firing rate (SOPs); every other op is a multiply-accumulate (MAC, E_MAC pJ):
LayerNorm, the WKV exp/divide, gates, any matmul on float input. E = E_AC * SOPs + E_MAC * MACs.
The teacher's count is its weight matmuls plus attention (Q K^T and A V over the (n+1)/2 keys a query sees
on average in a causal context of n tokens; sliding-window layers see at most the window); its elementwise
ops (norms, softmax, activations) are left out, which only favours the teacher.
"""

from __future__ import annotations

import json
from itertools import pairwise

import torch

from eval import EvalError

E_AC_PJ = 0.9
E_MAC_PJ = 4.6
CAVEAT = (
    "Compute energy only (45 nm, Horowitz 2014): memory traffic (weights, activations, state) is not "
    "counted, and it dominates real hardware at these sizes."
)
RATE_PROBE_ROWS = 4


@torch.no_grad()
def measure_rates(model, tokenizer, text: str, context_length: int) -> int:
    """Run up to RATE_PROBE_ROWS windows of `text` ([B, context_length]) through the model so its op counts
    carry measured firing rates; returns the number of tokens seen."""
    ids = tokenizer.encode(text)
    if not ids:
        raise EvalError("energy: the rate-probe text is empty; pass held-out text (e.g. --text persuasion)")
    rows = max(1, min(RATE_PROBE_ROWS, len(ids) // context_length))
    length = min(context_length, len(ids))
    batch = torch.tensor(ids[: rows * length], dtype=torch.long).view(rows, length)
    model(batch.to(next(model.parameters()).device))
    return rows * length


def mean_keys(context_length: int, window: int | None = None) -> float:
    """Keys a query attends to, averaged over the positions of a causal context of n tokens."""
    n = context_length
    if not window or window >= n:
        return (n + 1) / 2
    return (window * (window + 1) / 2 + (n - window) * window) / n


def teacher_op_rows(config, context_length: int) -> list[dict]:
    """All-MAC op rows per token of a HF causal LM config: every nn.Linear (in*out) plus attention matmuls.

    The model is built on the meta device (no memory, no weights) so the Linear shapes are the real ones
    (gated or plain MLP, GQA, tied head) for any architecture transformers knows.
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    rows = [
        _row(name, _layer_of(name), "matmul", m.in_features * m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    ]
    text_cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = text_cfg.num_attention_heads
    head_dim = getattr(text_cfg, "head_dim", None) or text_cfg.hidden_size // heads
    kinds = getattr(text_cfg, "layer_types", None) or ["full_attention"] * text_cfg.num_hidden_layers
    for layer, kind in enumerate(kinds):
        window = getattr(text_cfg, "sliding_window", None) if "sliding" in str(kind) else None
        keys = mean_keys(context_length, window)
        rows.append(_row(f"layers.{layer}.attn.scores", layer, "matmul", heads * head_dim * keys))
        rows.append(_row(f"layers.{layer}.attn.values", layer, "matmul", heads * head_dim * keys))
    return rows


def _layer_of(name: str) -> int | None:
    parts = name.split(".")
    for a, b in pairwise(parts):
        if a in ("layers", "h", "blocks", "layer") and b.isdigit():
            return int(b)
    return None


def _row(name, layer, kind, ops, binary=False, rate=None) -> dict:
    return {
        "name": name,
        "layer": layer,
        "kind": kind,
        "ops": float(ops),
        "binary_operand": binary,
        "rate": rate,
    }


def price_rows(rows: list[dict], e_ac: float = E_AC_PJ, e_mac: float = E_MAC_PJ) -> list[dict]:
    """Add "op" (AC/MAC), "sops", "macs", "energy_pj" to op rows. A binary-operand row without a measured
    rate is priced at rate 1.0 (an upper bound) and marked rate_measured=False."""
    priced = []
    for row in rows:
        row = dict(row)
        if row["binary_operand"]:
            row["rate_measured"] = row["rate"] is not None
            rate = row["rate"] if row["rate"] is not None else 1.0
            row.update(op="AC", sops=row["ops"] * rate, macs=0.0)
            row["energy_pj"] = row["sops"] * e_ac
        else:
            row.update(op="MAC", sops=0.0, macs=row["ops"])
            row["energy_pj"] = row["ops"] * e_mac
        priced.append(row)
    return priced


def totals(priced: list[dict]) -> dict:
    """Per-token sums of priced rows, and the op-weighted firing rate of the spike operands."""
    binary_ops = sum(r["ops"] for r in priced if r["op"] == "AC")
    sops = sum(r["sops"] for r in priced)
    return {
        "ops": sum(r["ops"] for r in priced),
        "sops": sops,
        "macs": sum(r["macs"] for r in priced),
        "energy_pj": sum(r["energy_pj"] for r in priced),
        "ac_fraction_of_ops": binary_ops / max(1.0, sum(r["ops"] for r in priced)),
        "mean_firing_rate": sops / binary_ops if binary_ops else None,
    }


def energy_report(
    model,
    context_length: int,
    tokenizer=None,
    text=None,
    teacher_config=None,
    e_ac: float = E_AC_PJ,
    e_mac: float = E_MAC_PJ,
) -> dict:
    """Per-layer and per-token energy of `model` at `context_length`, optionally against a teacher config.

    If tokenizer and text are given, the text is run through the model first so firing rates are measured
    (otherwise the rates of the model's last forward are used). A model without `op_counts` (an ANN) is
    counted all-MAC like a teacher. Returns a JSON-serialisable dict: rows (priced per layer), totals
    (per token: ops, sops, macs, energy_pj, mean_firing_rate), teacher (its totals or None), ratio
    ({energy,ops}_student_over_teacher), ratio_to_teacher (the energy ratio, or None), caveat.
    """
    if context_length < 1:
        raise EvalError(f"energy: context_length must be >= 1, got {context_length} (fix --context)")
    probe_tokens = measure_rates(model, tokenizer, text, context_length) if text and tokenizer else 0
    if hasattr(model, "op_counts"):
        rows = model.op_counts(context_length)
    else:
        rows = teacher_op_rows(model.config, context_length)
    priced = price_rows(rows, e_ac, e_mac)
    report = {
        "context_length": context_length,
        "e_ac_pj": e_ac,
        "e_mac_pj": e_mac,
        "rate_probe_tokens": probe_tokens,
        "rows": priced,
        "totals": totals(priced),
        "teacher": None,
        "ratio": None,
        "ratio_to_teacher": None,
        "caveat": CAVEAT,
    }
    if teacher_config is not None:
        teacher = totals(price_rows(teacher_op_rows(teacher_config, context_length), e_ac, e_mac))
        report["teacher"] = {"model_type": getattr(teacher_config, "model_type", ""), **teacher}
        report["ratio"] = {
            "energy_student_over_teacher": report["totals"]["energy_pj"] / teacher["energy_pj"],
            "ops_student_over_teacher": report["totals"]["ops"] / teacher["ops"],
        }
        report["ratio_to_teacher"] = report["ratio"]["energy_student_over_teacher"]
    return report


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def format_energy_table(report: dict) -> str:
    """Markdown: the per-layer table, per-token totals, the teacher and the ratio, and the caveat line."""
    title = (
        f"Energy per token at context {report['context_length']} "
        f"(E_AC {report['e_ac_pj']} pJ, E_MAC {report['e_mac_pj']} pJ; "
        f"firing rates from {report['rate_probe_tokens']} held-out tokens)"
    )
    lines = [
        title,
        "",
        "| module | layer | kind | ops/token | firing rate | AC/MAC | energy (pJ) |",
        "|---|---:|---|---:|---:|---|---:|",
    ]
    for r in report["rows"]:
        rate = (
            ""
            if not r["binary_operand"]
            else (f"{r['rate']:.4f}" if r["rate"] is not None else "1 (unmeasured)")
        )
        layer = "" if r["layer"] is None else r["layer"]
        lines.append(
            f"| {r['name']} | {layer} | {r['kind']} | {_fmt(r['ops'])} | {rate} | {r['op']} | "
            f"{_fmt(r['energy_pj'])} |"
        )
    t = report["totals"]
    lines += [
        "",
        f"Totals per token: {_fmt(t['sops'])} SOPs (AC), {_fmt(t['macs'])} MACs, "
        f"{t['energy_pj'] / 1e6:.4f} uJ; spike-operand ops {t['ac_fraction_of_ops']:.1%} of all ops"
        + (
            f", op-weighted firing rate {t['mean_firing_rate']:.4f}"
            if t["mean_firing_rate"] is not None
            else ""
        ),
    ]
    if report["teacher"]:
        te, ratio = report["teacher"], report["ratio"]
        lines.append(
            f"Teacher ({te['model_type']}, all MAC): {_fmt(te['macs'])} MACs, "
            f"{te['energy_pj'] / 1e6:.4f} uJ per token; student/teacher energy "
            f"{ratio['energy_student_over_teacher']:.4f} ({1 / ratio['energy_student_over_teacher']:.1f}x "
            f"less), ops {ratio['ops_student_over_teacher']:.4f}"
        )
    lines.append(f"Caveat: {report['caveat']}")
    return "\n".join(lines) + "\n"


def write_energy_json(report: dict, path) -> None:
    """Write the report as JSON (the same dict energy_report returned)."""
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
