"""Energy per token, three figures side by side: compute only, memory-inclusive, and a bit-matched quantised ANN.

Costs are 45 nm figures from Horowitz, "Computing's energy problem (and what we can do about it)", ISSCC 2014:
fp32 add 0.9 pJ and multiply 3.7 pJ (E_AC = 0.9, E_MAC = 4.6), 32-bit integer add 0.1 pJ, 8-bit integer
multiply 0.2 pJ; a 64-bit SRAM access costs 10 pJ at 8 KB, 20 pJ at 32 KB and 100 pJ at 1 MB, a 64-bit DRAM
access 1.3-2.6 nJ (we take 1.3 nJ, the low end, which favours the models that read more weights).

1. Compute only. The spiking student's op counts are structural (`model.op_counts(n)`, students/opcount.py):
   an op is an accumulate (AC, E_AC) only when one operand is a {0,1} spike tensor, and then counts as ops x
   measured firing rate (SOPs, the convention of SpikeGPT, arXiv 2302.13939, and BiSpikCLM); every other op is
   a multiply-accumulate (MAC, E_MAC): LayerNorm, the WKV exp/divide, gates, any matmul on float input. Any
   other model (teacher, matched ANN) is counted from one real forward at the reporting context
   (eval/forward_ops.py: matmul, attention, elementwise), every op a MAC. E = E_AC * SOPs + E_MAC * MACs.
2. Memory-inclusive: compute plus the memory traffic of one token at batch 1 (autoregressive decoding), in
   the spirit of Lemaire et al., "An analytical estimation of spiking neural networks energy efficiency"
   (ICONIP 2022, arXiv 2210.13107; spikingjelly's `op_counter` implements it). Three memories, each priced per
   byte by its own size (SRAM when it fits in 1 MB, interpolated between Horowitz's 8 KB, 32 KB and 1 MB
   points and never below the 8 KB one; DRAM above 1 MB):
   - weights (size: all parameters): a product on dense input reads every weight it uses once per token; a
     product on spikes reads only the weight rows of the inputs that fired (rate x weights, event-driven);
     each token reads one embedding row. Norm gains, biases and other per-channel vectors are not counted.
   - activations (size: the largest per-token input + output of one product): every product reads its input
     (1 bit per spike, else the activation width) and writes its output;
   - state (size: the whole state at the end of the context): the student reads and writes every recurrent
     element once per token (LIF membranes, token-shift inputs, WKV numerator/denominator/max, linear-attention
     state; fp32) and its spiking attention reads the binary K/V spikes of the keys a query sees (1 bit each);
     a transformer reads the cached keys and values its queries attend to and writes one key and value per
     token (per KV head).
   Addressing and control are not counted.
3. Bit-matched quantised ANN: the student's matched Llama (`students.matched_llama_config`: same width, depth,
   heads, FFN and vocabulary) counted from a real forward, with int8 weights and activations (a product is an
   8-bit multiply plus a 32-bit add, 0.3 pJ) and ternary BitNet-style weights (arXiv 2402.17764: 2-bit packed
   weights in {-1, 0, 1}, int8 activations; a product is a 32-bit add, 0.1 pJ); attention products are int8,
   elementwise work (norms, softmax, activations) stays fp32, the KV cache is int8.
The break-even firing rate is where the student's energy, with every spike operand firing at that rate,
equals the quantised ANN's; against such a baseline a spiking layer wins only at low firing (arXiv
2409.08290 finds roughly 6%).
Per byte: every figure per token x the tokens per UTF-8 byte of the held-out text under that model's own
tokenizer (the matched ANN shares the student's vocabulary and tokenizer), so models with different
vocabularies compare on the same text.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from itertools import pairwise

import torch

from eval import EvalError
from eval.forward_ops import KINDS, count_forward

E_AC_PJ = 0.9  # fp32 add
E_MAC_PJ = 4.6  # fp32 multiply (3.7) + add (0.9)
E_INT8_MAC_PJ = 0.2 + 0.1  # 8-bit multiply + 32-bit accumulate
E_TERNARY_MAC_PJ = 0.1  # a weight in {-1, 0, 1}: one 32-bit add or subtract
SRAM_PJ_PER_64BIT = ((8 * 1024, 10.0), (32 * 1024, 20.0), (1024 * 1024, 100.0))
DRAM_PJ_PER_64BIT = 1300.0
RATE_PROBE_ROWS = 4
# the longest reporting context: the rate probe runs the model over up to RATE_PROBE_ROWS x context tokens
# and the matched ANN and the teacher are counted from one real forward at the context (attention grows as
# its square), so a longer one runs for many minutes and may not fit in memory
MAX_CONTEXT = 16384
CAVEAT = (
    "Compute-only figures ignore memory traffic, which dominates real hardware; the memory-inclusive figures "
    "price it with the stated model (45 nm, Horowitz 2014; weights beyond 1 MB in DRAM), an estimate, not a "
    "measurement."
)
MEMORY_MODEL = (
    "per token at batch 1: weights read once per use (spike inputs: only the rows that fired), matmul inputs "
    "read and outputs written, recurrent state or KV cache read and written; each memory priced per byte by its "
    "size (SRAM up to 1 MB, else DRAM at 1.3 nJ per 64 bits)"
)


@dataclass(frozen=True)
class Precision:
    """Bit widths and per-op costs (pJ) of one way to run a dense model."""

    name: str
    weight_bits: float
    act_bits: float
    state_bits: float
    e_matmul: float
    e_attention: float
    e_elementwise: float


FP32 = Precision("fp32", 32, 32, 32, E_MAC_PJ, E_MAC_PJ, E_MAC_PJ)
INT8 = Precision("int8", 8, 8, 8, E_INT8_MAC_PJ, E_INT8_MAC_PJ, E_MAC_PJ)
TERNARY = Precision("ternary", 2, 8, 8, E_TERNARY_MAC_PJ, E_INT8_MAC_PJ, E_MAC_PJ)
QUANTISED = (INT8, TERNARY)


def access_pj_per_byte(memory_bytes: float) -> float:
    """pJ per byte of one access to a memory of `memory_bytes` (Horowitz 2014's 64-bit figures / 8)."""
    points = SRAM_PJ_PER_64BIT
    if memory_bytes > points[-1][0]:
        return DRAM_PJ_PER_64BIT / 8
    if memory_bytes <= points[0][0]:
        return points[0][1] / 8
    for (x0, y0), (x1, y1) in pairwise(points):
        if memory_bytes <= x1:
            return (y0 + (y1 - y0) * (memory_bytes - x0) / (x1 - x0)) / 8
    raise AssertionError("unreachable")


def _memory(traffic_bytes: dict[str, float], sizes: dict[str, float]) -> dict:
    """pJ per memory (weights, activations, state) from bytes moved and each memory's size in bytes."""
    out = {f"{k}_pj": traffic_bytes[k] * access_pj_per_byte(sizes[k]) for k in traffic_bytes}
    out["total_pj"] = sum(out.values())
    out["bytes"] = dict(traffic_bytes)
    out["sizes"] = dict(sizes)
    return out


def mean_keys(context_length: int, window: int | None = None) -> float:
    """Keys a query attends to, averaged over the positions of a causal context of n tokens (a sliding
    window: at most `window` keys, the query included)."""
    n = context_length
    if not window or window >= n:
        return (n + 1) / 2
    return (window * (window + 1) / 2 + (n - window) * window) / n


# ---------------------------------------------------------------- compute: rows and their prices


def _row(name, layer, kind, ops, binary=False, rate=None) -> dict:
    return {"name": name, "layer": layer, "kind": kind, "ops": float(ops), "binary_operand": binary, "rate": rate}


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


def totals(priced: list[dict], head: str | None = "lm_head") -> dict:
    """Per-token sums of priced rows, the op-weighted firing rate of the spike operands, and the head's share
    of the compute energy (rows named `head`)."""
    binary_ops = sum(r["ops"] for r in priced if r["op"] == "AC")
    sops = sum(r["sops"] for r in priced)
    energy = sum(r["energy_pj"] for r in priced)
    head_pj = sum(r["energy_pj"] for r in priced if head is not None and r["name"] == head)
    return {
        "ops": sum(r["ops"] for r in priced),
        "sops": sops,
        "macs": sum(r["macs"] for r in priced),
        "energy_pj": energy,
        "ac_fraction_of_ops": binary_ops / max(1.0, sum(r["ops"] for r in priced)),
        "mean_firing_rate": sops / binary_ops if binary_ops else None,
        "ops_by_kind": {k: sum(r["ops"] for r in priced if r["kind"] == k) for k in sorted({r["kind"] for r in priced})},
        "head_pj": head_pj,
        "head_share": head_pj / energy if energy else 0.0,
    }


def _rows_of_count(count) -> list[dict]:
    return [_row(r["name"], r["layer"], r["kind"], r["ops"]) for r in count.rows]


def teacher_op_rows(teacher, context_length: int) -> list[dict]:
    """All-MAC op rows per token of a HF causal LM (a loaded model, or a config built with random weights on
    the CPU), counted from one real forward over `context_length` tokens (eval/forward_ops.py)."""
    return _rows_of_count(count_forward(_as_model(teacher), context_length))


def _as_model(model_or_config):
    if isinstance(model_or_config, torch.nn.Module):
        return model_or_config
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(model_or_config).eval()


# ---------------------------------------------------------------- dense (ANN) figures


def param_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def dense_figures(count, params: int, precision: Precision = FP32) -> dict:
    """Compute-only and memory-inclusive pJ per token of a dense model from its forward count."""
    t = count.totals
    compute = {k: t[k] * getattr(precision, f"e_{k}") for k in KINDS}
    compute_pj = sum(compute.values())
    per_module = count.traffic.values()
    act_buffer = max((m["act_reads"] + m["act_writes"] for m in per_module), default=0.0) * precision.act_bits / 8
    memory = _memory(
        {
            "weights": t["weight_reads"] * precision.weight_bits / 8,
            "activations": (t["act_reads"] + t["act_writes"]) * precision.act_bits / 8,
            "state": (t["kv_reads"] + t["kv_writes"]) * precision.state_bits / 8,
        },
        {
            "weights": params * precision.weight_bits / 8,
            "activations": act_buffer,
            "state": count.kv_size * precision.state_bits / 8,
        },
    )
    head = count.head
    head_compute = sum(
        r["ops"] * getattr(precision, f"e_{r['kind']}") for r in count.rows if head and r["name"] == head
    )
    head_traffic = count.traffic.get(head, {}) if head else {}
    head_memory = (
        head_traffic.get("weight_reads", 0.0) * precision.weight_bits / 8 * access_pj_per_byte(memory["sizes"]["weights"])
        + (head_traffic.get("act_reads", 0.0) + head_traffic.get("act_writes", 0.0))
        * precision.act_bits / 8 * access_pj_per_byte(act_buffer)
    )
    total = compute_pj + memory["total_pj"]
    return {
        "precision": precision.name,
        "ops_by_kind": {k: t[k] for k in KINDS},
        "macs": sum(t[k] for k in KINDS),
        "energy_pj": compute_pj,
        "compute_pj": compute_pj,
        "memory": memory,
        "memory_inclusive_pj": total,
        "head_share_compute": head_compute / compute_pj if compute_pj else 0.0,
        "head_share_memory_inclusive": (head_compute + head_memory) / total if total else 0.0,
    }


# ---------------------------------------------------------------- the spiking student's memory traffic


def _linear_of(model, name: str):
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    return module if isinstance(module, torch.nn.Linear) else None


@torch.no_grad()
def student_state(model) -> dict:
    """The student's recurrent state per token from a real 2-token forward (batch 1): fixed fp32 elements
    (read and written once per token) and binary K/V spike elements per cached position (sfsa)."""
    from students.layers import SpikingSelfAttention
    from students.outputs import state_of

    ids = torch.zeros(1, 2, dtype=torch.long, device=next(model.parameters()).device)
    pause = getattr(model, "rates_paused", None)
    if pause is not None:
        with pause():
            state = state_of(model(ids, use_cache=True))
    else:
        state = state_of(model(ids, use_cache=True))
    fixed, kv_per_position = 0.0, 0.0
    for key, value in state.tensors.items():
        parts = [value] if isinstance(value, torch.Tensor) else list(value)
        module = model.get_submodule(key) if key else None
        if isinstance(module, SpikingSelfAttention) and not module.linear:
            kv_per_position += sum(p.numel() / p.shape[2] for p in parts)  # [B*T, H, L_seen, D]
        else:
            fixed += sum(p.numel() for p in parts)
    return {"fixed_elements": fixed, "kv_elements_per_position": kv_per_position}


def student_figures(model, priced: list[dict], state: dict, context_length: int, e_ac: float, e_mac: float,
                    rate: float | None = None) -> dict:
    """Compute-only and memory-inclusive pJ per token of the spiking student (fp32 weights and state, spikes
    1 bit). rate: price every spike operand at this firing rate instead of its measured one (break-even)."""
    weights = act_bytes = act_buffer = 0.0
    head_weights = head_act = 0.0
    compute = head_compute = 0.0
    for r in priced:
        spiking = r["binary_operand"]
        r_rate = rate if (spiking and rate is not None) else (r["rate"] if r["rate"] is not None else 1.0)
        energy = r["ops"] * r_rate * e_ac if spiking else r["ops"] * e_mac
        compute += energy
        linear = _linear_of(model, r["name"]) if r["kind"] == "matmul" else None
        if r["name"] == "lm_head":
            head_compute += energy
        if linear is None:
            continue
        steps = max(1.0, r["ops"] / (linear.in_features * linear.out_features))
        w = r["ops"] * r_rate if spiking else linear.in_features * linear.out_features
        a = (linear.in_features * (1 if spiking else 32) + linear.out_features * 32) * steps / 8
        weights += w * 4
        act_bytes += a
        act_buffer = max(act_buffer, a)
        if r["name"] == "lm_head":
            head_weights, head_act = w * 4, a
    cfg = model.config
    weights += cfg.d_model * 4  # the embedding row
    kv = state["kv_elements_per_position"]
    state_bytes = 2 * state["fixed_elements"] * 4 + (mean_keys(context_length) + 1) * kv / 8
    memory = _memory(
        {"weights": weights, "activations": act_bytes, "state": state_bytes},
        {"weights": param_count(model) * 4, "activations": act_buffer,
         "state": state["fixed_elements"] * 4 + context_length * kv / 8},
    )
    head_memory = (head_weights * access_pj_per_byte(memory["sizes"]["weights"])
                   + head_act * access_pj_per_byte(act_buffer))
    total = compute + memory["total_pj"]
    return {
        "precision": "fp32 weights, binary spikes",
        "compute_pj": compute,
        "memory": memory,
        "memory_inclusive_pj": total,
        "head_share_compute": head_compute / compute if compute else 0.0,
        "head_share_memory_inclusive": (head_compute + head_memory) / total if total else 0.0,
    }


def break_even_rate(at_zero: float, at_one: float, target: float) -> float | None:
    """The firing rate r where a + (b - a) r = target for an energy linear in r (None if flat)."""
    slope = at_one - at_zero
    return (target - at_zero) / slope if slope else None


# ---------------------------------------------------------------- the report


@torch.no_grad()
def check_context(context_length: int) -> None:
    """Raise EvalError unless 1 <= context_length <= MAX_CONTEXT (see MAX_CONTEXT)."""
    if not 1 <= context_length <= MAX_CONTEXT:
        raise EvalError(
            f"energy: context {context_length} is outside 1..{MAX_CONTEXT:,} (longer contexts are counted from "
            "real forwards whose attention grows as the square of the context: many minutes, or out of memory); "
            "lower --context")


def text_tokens_per_byte(tokenizer, text: str) -> float:
    """Tokens per UTF-8 byte of `text` under `tokenizer` (no special tokens, as bits/byte scores it)."""
    from eval.scoring import encode_document

    n_bytes = len(text.encode("utf-8"))
    if not n_bytes:
        raise EvalError("energy: the text for tokens per byte is empty; pass held-out text (e.g. --text persuasion)")
    return len(encode_document(tokenizer, text)) / n_bytes


def per_byte(report: dict, tokens_per_byte: float | None, teacher_tokens_per_byte: float | None = None) -> dict | None:
    """The report's figures per UTF-8 byte: each per-token figure x the tokens per byte of the held-out text
    under that model's own tokenizer (the quantised matched ANN: the student's). None without tokens_per_byte.
    Returns {"tokens_per_byte", "compute_pj", "memory_inclusive_pj", "quantised": {name: {"compute_pj",
    "memory_inclusive_pj"}}, "teacher": {"tokens_per_byte", "compute_pj", "memory_inclusive_pj"} | None}."""
    if tokens_per_byte is None:
        return None

    def scaled(f: dict, tpb: float) -> dict:
        return {"compute_pj": f["compute_pj"] * tpb, "memory_inclusive_pj": f["memory_inclusive_pj"] * tpb}

    teacher = report.get("teacher")
    return {
        "tokens_per_byte": tokens_per_byte,
        **scaled(report["figures"], tokens_per_byte),
        "quantised": {name: scaled(q, tokens_per_byte) for name, q in (report.get("quantised") or {}).items()},
        "teacher": ({"tokens_per_byte": teacher_tokens_per_byte, **scaled(teacher, teacher_tokens_per_byte)}
                    if teacher and teacher_tokens_per_byte is not None else None),
    }


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


def _matched_ann(model, context_length: int):
    """The dense model whose int8 / ternary prices are the quantised baseline: the spiking student's matched
    Llama (random weights: the counts do not depend on them), or the model itself when it is an ANN."""
    if not hasattr(model, "op_counts"):
        return model
    from students.baseline import matched_llama

    with torch.random.fork_rng():
        torch.manual_seed(0)
        return matched_llama(model.config, max_position=max(2048, context_length)).eval()


def energy_report(
    model,
    context_length: int,
    tokenizer=None,
    text=None,
    teacher_config=None,
    e_ac: float = E_AC_PJ,
    e_mac: float = E_MAC_PJ,
    quantised: bool = True,
    teacher_entry: dict | None = None,
    tokens_per_byte: float | None = None,
    teacher_tokens_per_byte: float | None = None,
) -> dict:
    """Per-layer and per-token energy of `model` at `context_length`: three figures side by side.

    model: the spiking student (structural op counts, measured rates) or any HF causal LM (counted from a real
    forward, all MAC). tokenizer + text: run the text first so firing rates are measured (otherwise the rates
    of the model's last forward are used). teacher_config: a teacher model (or a config, built with random
    weights) counted from a real forward, all MAC, fp32; or teacher_entry, a `teacher_energy` result computed
    before (it costs one teacher forward at the context). quantised: add the int8 and ternary matched-ANN rows.
    Returns a JSON-serialisable dict: rows (priced, per layer), totals (compute, per token: ops, sops, macs,
    energy_pj, mean_firing_rate, head_share), figures ({compute_pj, memory_inclusive_pj, memory,
    head_share_compute, head_share_memory_inclusive}), quantised ({int8, ternary}: the same figures of the
    matched ANN, or None), break_even ({int8, ternary}: {compute, memory_inclusive} firing rates, spiking
    students only), teacher (its totals and figures, or None), ratio ({energy,ops,memory_inclusive}
    _student_over_teacher), ratio_to_teacher (compute energy ratio or None), per_byte (`per_byte`: every
    figure per UTF-8 byte; tokens_per_byte defaults to that of `text` under `tokenizer`, the teacher's needs
    teacher_tokens_per_byte; None without either), memory_model, caveat.
    Raises EvalError for a context outside 1..MAX_CONTEXT or an empty probe text.
    """
    check_context(context_length)
    if tokens_per_byte is None and text and tokenizer is not None:
        tokens_per_byte = text_tokens_per_byte(tokenizer, text)
    spiking = hasattr(model, "op_counts")
    state = student_state(model) if spiking else None  # before the rate probe: its forward would overwrite rates
    probe_tokens = measure_rates(model, tokenizer, text, context_length) if text and tokenizer else 0
    if spiking:
        priced = price_rows(model.op_counts(context_length), e_ac, e_mac)
        head = "lm_head"
        figures = student_figures(model, priced, state, context_length, e_ac, e_mac)
    else:
        count = count_forward(model, context_length)
        priced = price_rows(_rows_of_count(count), e_ac, e_mac)
        head = count.head
        figures = dense_figures(count, param_count(model), _fp32(e_mac))
    report = {
        "context_length": context_length,
        "e_ac_pj": e_ac,
        "e_mac_pj": e_mac,
        "rate_probe_tokens": probe_tokens,
        "rows": priced,
        "totals": totals(priced, head),
        "figures": figures,
        "quantised": None,
        "break_even": None,
        "teacher": None,
        "ratio": None,
        "ratio_to_teacher": None,
        "memory_model": MEMORY_MODEL,
        "caveat": CAVEAT,
    }
    if quantised:
        ann = _matched_ann(model, context_length)
        ann_count = count_forward(ann, context_length)
        report["quantised"] = {
            p.name: {"model": f"{getattr(ann.config, 'model_type', 'ann')} {param_count(ann) / 1e6:.2f}M",
                     **dense_figures(ann_count, param_count(ann), p)}
            for p in QUANTISED
        }
        if spiking:
            low = student_figures(model, priced, state, context_length, e_ac, e_mac, rate=0.0)
            high = student_figures(model, priced, state, context_length, e_ac, e_mac, rate=1.0)
            report["break_even"] = {
                name: {
                    key: break_even_rate(low[key], high[key], q[key])
                    for key in ("compute_pj", "memory_inclusive_pj")
                }
                for name, q in report["quantised"].items()
            }
    if teacher_entry is None and teacher_config is not None:
        teacher_entry = teacher_energy(teacher_config, context_length, e_mac)
    if teacher_entry is not None:
        t_fig = report["teacher"] = teacher_entry
        report["ratio"] = {
            "energy_student_over_teacher": figures["compute_pj"] / t_fig["compute_pj"],
            "ops_student_over_teacher": report["totals"]["ops"] / t_fig["macs"],
            "memory_inclusive_student_over_teacher": figures["memory_inclusive_pj"] / t_fig["memory_inclusive_pj"],
        }
        report["ratio_to_teacher"] = report["ratio"]["energy_student_over_teacher"]
    report["per_byte"] = per_byte(report, tokens_per_byte, teacher_tokens_per_byte)
    return report


def teacher_energy(teacher, context_length: int, e_mac: float = E_MAC_PJ) -> dict:
    """The teacher's entry of an energy report: a loaded HF causal LM (or a config, built with random weights)
    counted from one real forward over `context_length` tokens, all MAC, fp32 weights, activations and KV
    cache. Returns {"model_type", "sops", "ops_by_kind", "macs", "energy_pj", "compute_pj", "memory",
    "memory_inclusive_pj", "head_share_compute", "head_share_memory_inclusive", "precision",
    "context_length"}."""
    model = _as_model(teacher)
    figures = dense_figures(count_forward(model, context_length), param_count(model), _fp32(e_mac))
    return {"model_type": getattr(model.config, "model_type", ""), "sops": 0.0, "context_length": context_length,
            **figures}


def _fp32(e_mac: float) -> Precision:
    return Precision("fp32", 32, 32, 32, e_mac, e_mac, e_mac)


# ---------------------------------------------------------------- tables


def _fmt(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def _rate_text(r: float | None) -> str:
    if r is None:
        return "n/a"
    if r < 0:
        return "never (its rate-independent part alone costs more)"
    if r > 1:
        return "at any rate (even 1.0)"
    return f"{r:.3f}"


def figures_table(report: dict) -> str:
    """Markdown: the three figures (compute only, memory-inclusive, quantised ANN) per token and per byte
    (with the tokens per byte they use), with the head's share."""
    lines = [
        ("| model | compute only (nJ/token) | memory-inclusive (nJ/token) | tokens/byte | compute only (nJ/byte) "
         "| memory-inclusive (nJ/byte) | head share (compute / memory-incl.) |"),
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    pb = report.get("per_byte") or {}

    def line(label, f, b):
        cells = [label, f"{f['compute_pj'] / 1e3:,.2f}", f"{f['memory_inclusive_pj'] / 1e3:,.1f}"]
        cells += ["", "", ""] if not b else [f"{b.get('tokens_per_byte', pb['tokens_per_byte']):.4f}",
                                             f"{b['compute_pj'] / 1e3:,.2f}", f"{b['memory_inclusive_pj'] / 1e3:,.1f}"]
        cells.append(f"{f['head_share_compute']:.0%} / {f['head_share_memory_inclusive']:.0%}")
        lines.append("| " + " | ".join(cells) + " |")

    rate = report["totals"].get("mean_firing_rate")
    line("this model" + (f" (firing rate {rate:.3f})" if rate is not None else " (fp32)"), report["figures"], pb)
    for name, q in (report.get("quantised") or {}).items():
        line(f"quantised ANN, {name} ({q['model']})", q, (pb.get("quantised") or {}).get(name))
    if report.get("teacher"):
        line(f"teacher ({report['teacher']['model_type']}, fp32)", report["teacher"], pb.get("teacher"))
    out = "\n".join(lines) + "\n"
    if pb:
        out += ("\nPer byte = per token x tokens per UTF-8 byte of the held-out text under the model's own "
                "tokenizer (the quantised ANN shares the student's).\n")
    for name, be in (report.get("break_even") or {}).items():
        out += (
            f"\nBreak-even firing rate against the {name} ANN (the student wins below it): compute only "
            f"{_rate_text(be['compute_pj'])}; memory-inclusive {_rate_text(be['memory_inclusive_pj'])}."
        )
    return out + "\n"


def format_energy_table(report: dict) -> str:
    """Markdown: the per-layer table, per-token totals, the three figures, break-even rates, the memory model,
    and the caveat."""
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
            f"| {r['name'] or '(root)'} | {layer} | {r['kind']} | {_fmt(r['ops'])} | {rate} | {r['op']} | "
            f"{_fmt(r['energy_pj'])} |"
        )
    t = report["totals"]
    lines += [
        "",
        f"Totals per token: {_fmt(t['sops'])} SOPs (AC), {_fmt(t['macs'])} MACs, "
        f"{t['energy_pj'] / 1e6:.4f} uJ compute; spike-operand ops {t['ac_fraction_of_ops']:.1%} of all ops"
        + (
            f", op-weighted firing rate {t['mean_firing_rate']:.4f}"
            if t["mean_firing_rate"] is not None
            else ""
        ),
    ]
    if report["teacher"]:
        te, ratio = report["teacher"], report["ratio"]
        kinds = ", ".join(f"{k} {_fmt(v)}" for k, v in te["ops_by_kind"].items())
        lines.append(
            f"Teacher ({te['model_type']}, all MAC, from one forward): {_fmt(te['macs'])} MACs ({kinds}), "
            f"{te['compute_pj'] / 1e6:.4f} uJ per token; student/teacher energy "
            f"{ratio['energy_student_over_teacher']:.4f} ({1 / ratio['energy_student_over_teacher']:.1f}x "
            f"less), ops {ratio['ops_student_over_teacher']:.4f}, memory-inclusive "
            f"{ratio['memory_inclusive_student_over_teacher']:.4f}"
        )
    lines += ["", figures_table(report).rstrip("\n"), "", f"Memory model: {report['memory_model']}.",
              f"Caveat: {report['caveat']}"]
    return "\n".join(lines) + "\n"


def write_energy_json(report: dict, path) -> None:
    """Write the report as JSON (the same dict energy_report returned)."""
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
