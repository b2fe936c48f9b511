"""Exact, hand-checkable op counts of a SpikeGPT student per token (T steps included).

Conventions (ops per element, per step unless said otherwise; C width, F = ffn_mult*C, V vocab, H heads,
D = C/H, T time steps, n context):
  matmul        Linear in->out: in*out multiply-accumulates per step; the LM head runs once per token.
  LIF           6: charge (2 mul, 1 add), fire (1 compare), reset (2).
  LayerNorm     6: mean-accumulate, centre, square-accumulate, normalise, scale, shift. ln0 runs once per token
                (before the T-fold repetition).
  token shift   1 + 2*branches: one difference, then a multiply-add per branch.
  WKV           23 per channel (12 for the output, 11 for the state update, as in the reference).
  gate          4: sigmoid (exp, add, divide) and a multiply.  relu^2: 2.  residual add: 1.
  binary emb    1 compare per channel, once per token.  mean over T (T > 1): T per element (adds + divide).
  sfsa          Q K^T and A V over the (n+1)/2 keys a query sees on average in a causal sequence of length n;
                1 compare per causal score for the spiking neuron (the mask is implicit: only causal scores
                are computed).
  sfsa_linear   the recurrent form: state += k^T v (C*D) and out = q @ state (C*D), independent of n.
"binary_operand" is True only when one operand is a {0,1} spike tensor; "rate" is its measured firing rate
from the last forward (None before any forward or when not binary).
"""
from __future__ import annotations

from .layers import SpikeLinear, SpikingRWKV

LIF_OPS = 6
NORM_OPS = 6
WKV_OPS = 23
GATE_OPS = 4


class _Counter:
    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, name, layer, kind, ops, binary=False, rate=None):
        self.rows.append(
            {"name": name, "layer": layer, "kind": kind, "ops": float(ops), "binary_operand": bool(binary),
             "rate": rate if binary else None}
        )

    def linear(self, name, layer, module: SpikeLinear, steps: int):
        self.add(name, layer, "matmul", module.in_features * module.out_features * steps,
                 module.binary_input, module.input_rate)

    def lif(self, name, layer, module, steps: int):
        if module is not None:
            self.add(name, layer, "elementwise", LIF_OPS * module.width * steps)


def count_ops(model, context_length: int) -> list[dict]:
    """model: SpikeGPTForCausalLM -> list of {"name", "layer", "kind", "ops", "binary_operand", "rate"}."""
    cfg, steps, c = model.config, model.config.time_steps, model.config.d_model
    out = _Counter()
    if cfg.binary_embedding:
        out.add("emb.spike", None, "elementwise", c)
    out.add("ln0", None, "norm", NORM_OPS * c)
    for i, block in enumerate(model.blocks):
        p = f"blocks.{i}"
        out.add(f"{p}.ln1", i, "norm", NORM_OPS * c * steps)
        if isinstance(block.mixer, SpikingRWKV):
            _rwkv(out, p, i, block.mixer, c, steps)
        else:
            _sfsa(out, p, i, block.mixer, cfg, context_length, steps)
        out.lif(f"{p}.mixer_neuron", i, block.mixer_neuron, steps)
        out.add(f"{p}.residual1", i, "elementwise", c * steps)
        out.add(f"{p}.ln2", i, "norm", NORM_OPS * c * steps)
        _ffn(out, p, i, block.ffn, c, cfg.ffn_hidden, steps)
        out.lif(f"{p}.ffn_neuron", i, block.ffn_neuron, steps)
        out.add(f"{p}.residual2", i, "elementwise", c * steps)
    out.add("ln_out", None, "norm", NORM_OPS * c * steps)
    out.lif("head_neuron", None, model.head_neuron, steps)
    if steps > 1:
        out.add("mean_over_steps", None, "elementwise", c * steps)
    out.linear("lm_head", None, model.lm_head, 1)
    return out.rows


def _rwkv(out: _Counter, p: str, i: int, m, c: int, steps: int) -> None:
    out.add(f"{p}.mixer.shift", i, "elementwise", (1 + 2 * 3) * c * steps)
    out.lif(f"{p}.mixer.in_neuron", i, m.in_neuron, steps)
    for name in ("key", "value", "receptance"):
        out.linear(f"{p}.mixer.{name}", i, getattr(m, name), steps)
    out.add(f"{p}.mixer.wkv", i, "elementwise", WKV_OPS * c * steps)
    out.add(f"{p}.mixer.gate", i, "elementwise", GATE_OPS * c * steps)
    out.lif(f"{p}.mixer.out_neuron", i, m.out_neuron, steps)
    out.linear(f"{p}.mixer.output", i, m.output, steps)


def _sfsa(out: _Counter, p: str, i: int, m, cfg, n: int, steps: int) -> None:
    c, d = cfg.d_model, cfg.head_dim
    out.lif(f"{p}.mixer.in_neuron", i, m.in_neuron, steps)
    for name in ("query", "key", "value"):
        out.linear(f"{p}.mixer.{name}", i, getattr(m, name), steps)
    out.lif(f"{p}.mixer.qkv_neuron", i, m.qkv_neuron, steps)
    if m.linear:
        out.add(f"{p}.mixer.state_update", i, "matmul", c * d * steps, True, m.part_rate("k"))
        out.add(f"{p}.mixer.readout", i, "matmul", c * d * steps, True, m.part_rate("q"))
    else:
        keys = (n + 1) / 2
        out.add(f"{p}.mixer.scores", i, "matmul", c * keys * steps, True, m.part_rate("q"))
        out.add(f"{p}.mixer.attn_neuron", i, "elementwise", cfg.n_head * keys * steps)
        out.add(f"{p}.mixer.attn_values", i, "matmul", c * keys * steps, True, m.attention_rate)
    out.lif(f"{p}.mixer.out_neuron", i, m.out_neuron, steps)
    out.linear(f"{p}.mixer.output", i, m.output, steps)


def _ffn(out: _Counter, p: str, i: int, m, c: int, hidden: int, steps: int) -> None:
    out.add(f"{p}.ffn.shift", i, "elementwise", (1 + 2 * 2) * c * steps)
    out.lif(f"{p}.ffn.in_neuron", i, m.in_neuron, steps)
    out.linear(f"{p}.ffn.key", i, m.key, steps)
    out.linear(f"{p}.ffn.receptance", i, m.receptance, steps)
    out.add(f"{p}.ffn.relu_square", i, "elementwise", 2 * hidden * steps)
    out.lif(f"{p}.ffn.hidden_neuron", i, m.hidden_neuron, steps)
    out.linear(f"{p}.ffn.value", i, m.value, steps)
    out.add(f"{p}.ffn.gate", i, "elementwise", GATE_OPS * c * steps)
