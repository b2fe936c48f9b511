"""The fused CPU decode step: the weights of a model laid out for decode_ops.cpp (ctypes structures mirroring its
structs), the state bound to it, and the call (see this op's __init__.py).
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from .._dispatch import kernel_backend
from ..csrc import library, threads
from ..event_linear import MIN_WEIGHTS, sparse_mode
from ..event_linear.calibrate import crossover, max_event_rows
from ..lif.reference import charge_constants
from ..wkv.reference import NEG_INF, decay_rate

_P, _F = ctypes.c_void_p, ctypes.c_float


class _Lif(ctypes.Structure):  # decode_ops.cpp: DecodeLif
    _fields_ = [("inv_tau", ctypes.c_double), ("beta", ctypes.c_double), ("kind", ctypes.c_int32),
                ("soft", ctypes.c_int32), ("vth", _F)]


_BLOCK_WEIGHTS = ["ln1_w", "ln1_b", "ln2_w", "ln2_b", "att_mix", "ffn_mix", "att_key", "att_value", "att_receptance",
                  "att_output", "decay", "bonus", "ffn_key", "ffn_receptance", "ffn_value"]
_BLOCK_LIFS = ["att_in", "att_out", "mixer", "ffn_in", "ffn_hidden", "ffn_out"]
_BLOCK_STATE = ["att_prev", "v_att_in", "num", "den", "pmax", "v_att_out", "v_mixer", "ffn_prev", "v_ffn_in",
                "v_hidden", "v_ffn_out"]


class _Block(ctypes.Structure):  # decode_ops.cpp: SrwkvBlock
    _fields_ = [(n, _P) for n in _BLOCK_WEIGHTS] + [(n, _Lif) for n in _BLOCK_LIFS] + [(n, _P) for n in _BLOCK_STATE]


class _Model(ctypes.Structure):  # decode_ops.cpp: DecodeModel
    _fields_ = [("n_layer", ctypes.c_int64), ("C", ctypes.c_int64), ("F", ctypes.c_int64), ("V", ctypes.c_int64),
                ("binary_embedding", ctypes.c_int32), ("eps", _F), ("emb", _P), ("ln0_w", _P), ("ln0_b", _P),
                ("ln_out_w", _P), ("ln_out_b", _P), ("head", _P), ("head_lif", _Lif), ("v_head", _P),
                ("blocks", _P)]


def unsupported(model: nn.Module) -> str | None:
    """Why the fused step cannot run `model` (a SpikeGPTForCausalLM), or None when it can."""
    cfg = model.config
    if not cfg.spike_driven or cfg.time_steps != 1:
        return "it needs spike_driven=True and time_steps=1"
    if any(kind != "srwkv" for kind in cfg.layer_mixers):
        return "it supports srwkv blocks only"
    params = list(model.parameters())
    if any(p.dtype != torch.float32 or not p.is_cpu for p in params):
        return "it needs fp32 weights on CPU"
    if any(getattr(m, "bias", None) is not None for m in model.modules() if isinstance(m, nn.Linear)):
        return "it needs Linears without a bias"
    if model.emb.num_embeddings != model.lm_head.out_features:
        return "the embedding and the head must have the same vocabulary"
    if len({m.eps for m in model.modules() if isinstance(m, nn.LayerNorm)}) != 1:
        return "every LayerNorm must have the same eps"
    if kernel_backend(params[0].device) != "cpu" or library() is None:
        return "it needs the CPU kernel library (SPIKEDISTILL_KERNELS not 'reference')"
    return None


def _lif(neuron) -> _Lif:
    k = neuron.kwargs
    kind, inv_tau, beta = charge_constants(k["tau"], k["decay_input"])
    return _Lif(inv_tau, beta, kind, int(k["reset"] == "soft"), float(k["v_threshold"]))


class FusedDecoder:
    """The weights of one model laid out for decode_ops.cpp, and the state it is bound to.

    Built once per `model.decoding()` context: W^T of each Linear comes from the layer's `EventWeight` (built
    there if not yet), the LIF parameters are read from each neuron's kwargs. Weights changed inside the
    context are not seen.
    """

    def __init__(self, model: nn.Module):
        self.model, self._keep = model, []
        cfg = model.config
        self.C, self.V = cfg.d_model, cfg.vocab_size
        self.blocks = (_Block * cfg.n_layer)()
        for i, block in enumerate(model.blocks):
            for name, t in self._block_weights(block).items():
                setattr(self.blocks[i], name, self._ptr(t))
            att, ffn = block.mixer, block.ffn
            lifs = [att.in_neuron, att.out_neuron, block.mixer_neuron, ffn.in_neuron, ffn.hidden_neuron,
                    block.ffn_neuron]
            for name, neuron in zip(_BLOCK_LIFS, lifs):
                setattr(self.blocks[i], name, _lif(neuron))
        self.head_t = model.lm_head._event_weight.get(model.lm_head.weight)
        self.spec = _Model(cfg.n_layer, self.C, cfg.ffn_hidden, self.V, int(cfg.binary_embedding),
                           model.ln0.eps, self._ptr(model.emb.weight), self._ptr(model.ln0.weight),
                           self._ptr(model.ln0.bias), self._ptr(model.ln_out.weight), self._ptr(model.ln_out.bias),
                           self._ptr(self.head_t), _lif(model.head_neuron), None,
                           ctypes.addressof(self.blocks))
        self.state, self.epoch, self.rows = None, -1, 0

    def _ptr(self, t: torch.Tensor) -> int:
        t = t.detach().contiguous()  # fp32 (`unsupported`); kept alive while the structs point at it
        self._keep.append(t)
        return t.data_ptr()

    @staticmethod
    def _block_weights(block) -> dict[str, torch.Tensor]:
        att, ffn = block.mixer, block.ffn

        def wt(linear):
            return linear._event_weight.get(linear.weight)

        return {"ln1_w": block.ln1.weight, "ln1_b": block.ln1.bias, "ln2_w": block.ln2.weight,
                "ln2_b": block.ln2.bias, "att_mix": att.shift.mix, "ffn_mix": ffn.shift.mix,
                "att_key": wt(att.key), "att_value": wt(att.value), "att_receptance": wt(att.receptance),
                "att_output": wt(att.output), "decay": decay_rate(att.time_decay.detach()).contiguous(),
                "bonus": att.time_first, "ffn_key": wt(ffn.key), "ffn_receptance": wt(ffn.receptance),
                "ffn_value": wt(ffn.value)}

    def runs_for(self, rows: int) -> float | None:
        """The head's rate limit for a step of `rows` rows (None: the step does not run fused)."""
        mode = sparse_mode()
        if mode == "off":
            return None
        if mode == "on":
            return 1.0
        if rows > 1 and rows > max_event_rows():  # one row: fused whatever the table (see __init__.py)
            return None
        weights = self.C * self.V
        return 1.0 if weights < MIN_WEIGHTS else (crossover(rows, weights) or 0.0)

    def step(self, input_ids: torch.Tensor, state, head_max_rate: float):
        """input_ids [B, 1] -> (logits [B, 1, V], head input spikes [B, 1, C]), advancing `state` in place;
        None (nothing changed) when a token id is outside the vocabulary (the module path raises then)."""
        rows = input_ids.shape[0]
        if state is not self.state or state.epoch != self.epoch or rows != self.rows:
            self._bind(state, rows)
        tokens = input_ids.reshape(rows).to(torch.int64).contiguous()
        logits = torch.empty(rows, 1, self.V)
        head_input = torch.empty(rows, 1, self.C)
        status = library().decode_step(ctypes.addressof(self.spec), tokens.data_ptr(), rows, logits.data_ptr(),
                                       head_input.data_ptr(), head_max_rate, threads())
        if status == 2:
            return None
        if status == 1:  # the head's rate is above the crossover: the dense matmul on its spikes
            logits = F.linear(head_input, self.model.lm_head.weight)
        return logits, head_input

    def _bind(self, state, rows: int) -> None:
        """Give `state` private fp32 buffers [rows, width] (copies of its entries, or the zero state) that the
        C step updates in place, and point the structs at them."""
        model = self.model
        for i, block in enumerate(model.blocks):
            att, ffn = block.mixer, block.ffn
            c, f = self.C, model.config.ffn_hidden
            entries = {"att_prev": (att.shift, c), "v_att_in": (att.in_neuron, 3 * c), "v_att_out": (att.out_neuron, c),
                       "v_mixer": (block.mixer_neuron, c), "ffn_prev": (ffn.shift, c), "v_ffn_in": (ffn.in_neuron, 2 * c),
                       "v_hidden": (ffn.hidden_neuron, f), "v_ffn_out": (block.ffn_neuron, c)}
            for name, (module, width) in entries.items():
                setattr(self.blocks[i], name, self._own(state, module.state_key, rows, width))
            wkv = state.get(att.state_key) or (None, None, None)
            own = tuple(_copy(t, rows, self.C, fill) for t, fill in zip(wkv, (0.0, 0.0, NEG_INF)))
            state.set(att.state_key, own)
            self.blocks[i].num, self.blocks[i].den, self.blocks[i].pmax = (t.data_ptr() for t in own)
        self.spec.v_head = self._own(state, model.head_neuron.state_key, rows, self.C)
        self.state, self.epoch, self.rows = state, state.epoch, rows

    @staticmethod
    def _own(state, key: str, rows: int, width: int) -> int:
        buf = _copy(state.get(key), rows, width, 0.0)
        state.set(key, buf)
        return buf.data_ptr()


def _copy(t: torch.Tensor | None, rows: int, width: int, fill: float) -> torch.Tensor:
    """A new contiguous fp32 [rows, width] tensor holding t's values, or `fill` when t is None."""
    if t is None:
        return torch.full((rows, width), fill)
    return t.detach().to(torch.float32).reshape(rows, width).clone()
