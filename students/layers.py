"""Building blocks of the spiking student: SpikeLinear, LIF, token shift, SRWKV, SFSA, SRFFN and the block.

Two layouts (B batch, L tokens, T steps per token, C channels):
  steps layout [B, L*T, C], token-major and step-minor: LIF membranes, LayerNorms, Linears and residual adds;
  mixer layout [B*T, L, C]: token mixers (token shift, WKV, SFSA) run over the tokens once per step t.
For T = 1 both are the same tensor. Layers call only the dispatch functions of `students.ops`.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import SpikeGPTConfig
from .ops import (
    EventWeight,
    event_linear,
    lif_scan,
    relu_square_lif,
    sfsa,
    sfsa_linear,
    sigmoid_gate_lif,
    spike,
    token_shift_lif,
    wkv,
)
from .state import SpikeGPTState


def to_mixer(x: torch.Tensor, steps: int) -> torch.Tensor:
    """[B, L*T, C] -> [B*T, L, C]."""
    if steps == 1:
        return x
    b, s, c = x.shape
    return x.view(b, s // steps, steps, c).transpose(1, 2).reshape(b * steps, s // steps, c)


def to_steps(x: torch.Tensor, steps: int) -> torch.Tensor:
    """[B*T, L, C] -> [B, L*T, C]."""
    if steps == 1:
        return x
    bt, n, c = x.shape
    return x.view(bt // steps, steps, n, c).transpose(1, 2).reshape(bt // steps, n * steps, c)


def _mean_over_steps(maps: torch.Tensor, steps: int) -> torch.Tensor:
    """[B*T, ...] -> [B, ...], averaged over the T steps."""
    return maps.view(maps.shape[0] // steps, steps, *maps.shape[1:]).mean(1)


class SpikeLinear(nn.Linear):
    """nn.Linear that records what it reads: `binary_input` says whether its input is a {0,1} spike tensor in
    this configuration; `input_rate` is the mean of its input over the last forward (the firing rate if binary).

    A binary-input layer runs through `ops.event_linear`, which at inference (no gradient) on CPU sums only the
    weight columns of the active spikes where that is faster than the dense matmul (SPIKEDISTILL_SPARSE)."""

    track_rate = True  # the model switches this off per instance during decode steps (keeps them lean)

    def __init__(self, in_features: int, out_features: int, binary_input: bool, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias)
        self.binary_input = binary_input
        self._rate: torch.Tensor | None = None
        self._event_weight = EventWeight()  # W^T for the event path, built on its first use

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        if self.track_rate:
            self.record_rate(x)
        if self.binary_input:
            return event_linear(x, self.weight, self.bias, self._event_weight)
        return super().forward(x)

    def record_rate(self, x: torch.Tensor) -> None:
        """Record x [..., in] as this layer's input (`input_rate`), for a caller that applies the weight itself
        (the model's fused LM head + cross-entropy)."""
        self._rate = x.detach().mean()

    @property
    def input_rate(self) -> float | None:
        return None if self._rate is None else float(self._rate)


class LIF(nn.Module):
    """Multi-step LIF neurons of `width` channels over the steps layout; the membrane is recurrent state."""

    track_rate = True

    def __init__(self, config: SpikeGPTConfig, width: int):
        super().__init__()
        self.width = width
        self.state_key = ""  # set by the model to this module's qualified name
        self.kwargs = {
            "tau": config.lif_tau,
            "v_threshold": config.lif_threshold,
            "reset": config.lif_reset,
            "decay_input": config.lif_decay_input,
            "detach_reset": config.lif_detach_reset,
            "surrogate": config.surrogate,
            "alpha": config.surrogate_alpha,
        }
        self._rate: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, state: SpikeGPTState | None) -> torch.Tensor:
        """x [B, L*T, N] input current -> spikes [B, L*T, N] in {0, 1}."""
        spikes, v_last = lif_scan(x, self.membrane(state), **self.kwargs)
        return self.emit(spikes, v_last, state)

    def fed_by(self, op, *inputs, state: SpikeGPTState | None) -> torch.Tensor:
        """Spikes of these neurons fed by a fused producer: op(*inputs, v0, lif) -> (spikes, v_last), one of the
        `students.ops` fused-LIF functions (e.g. sigmoid_gate_lif: the current is sigmoid(r) * y)."""
        spikes, v_last = op(*inputs, self.membrane(state), self.kwargs)
        return self.emit(spikes, v_last, state)

    def membrane(self, state: SpikeGPTState | None) -> torch.Tensor | None:
        """The membrane [B, N] carried in `state` (None: a fresh start at zero)."""
        return state.get(self.state_key) if state is not None else None

    def emit(self, spikes: torch.Tensor, v_last: torch.Tensor, state: SpikeGPTState | None) -> torch.Tensor:
        """Store the final membrane in `state`, record the firing rate; returns spikes."""
        if state is not None:
            state.set(self.state_key, v_last)
        if self.track_rate:
            self._rate = spikes.detach().mean()
        return spikes

    @property
    def firing_rate(self) -> float | None:
        return None if self._rate is None else float(self._rate)


class TokenShift(nn.Module):
    """Per-channel mix of each token with the previous one: x*mu + x_prev*(1-mu), one mu per branch.

    `owner` ("rwkv" or "ffn") and `layer_id` select SpikeGPT's initial curves (see the model's _init_weights).
    """

    def __init__(self, width: int, branches: int, owner: str, layer_id: int):
        super().__init__()
        self.mix = nn.Parameter(torch.empty(branches, width))
        self.owner, self.layer_id = owner, layer_id
        self.state_key = ""

    def forward(self, x: torch.Tensor, state: SpikeGPTState | None, steps: int = 1, neuron: LIF | None = None):
        """x [B, L*T, C] (steps layout) -> mixed branches concatenated [B, L*T, branches*C], or their spikes
        through `neuron` (a LIF of width branches*C) in the same fused pass. Each token pairs with the previous
        token at the same step t."""
        prev = state.get(self.state_key) if state is not None else None
        v0 = neuron.membrane(state) if neuron is not None else None
        out, v_last, last = token_shift_lif(x, self.mix, prev, v0, steps, neuron.kwargs if neuron else None)
        if state is not None:
            state.set(self.state_key, last)
        return neuron.emit(out, v_last, state) if neuron is not None else out


def _gate(r: torch.Tensor, y: torch.Tensor, neuron: LIF | None, state: SpikeGPTState | None) -> torch.Tensor:
    """sigmoid(r) * y, through `neuron` in the same fused pass when there is one. r, y [B, L*T, C]."""
    if neuron is None:
        return sigmoid_gate_lif(r, y)[0]
    return neuron.fed_by(sigmoid_gate_lif, r, y, state=state)


class SpikingRWKV(nn.Module):
    """SpikeGPT's spiking RWKV-4 token mixer: out = W_o(sigmoid(r) * WKV(k, v)) with learned decay and bonus.

    spike_driven: LIF neurons after the token shift (so W_k, W_v, W_r read spikes) and before W_o.
    """

    def __init__(self, config: SpikeGPTConfig, layer_id: int):
        super().__init__()
        c, sd = config.d_model, config.spike_driven
        self.layer_id, self.n_head = layer_id, config.n_head
        self.shift = TokenShift(c, 3, "rwkv", layer_id)
        self.in_neuron = LIF(config, 3 * c) if sd else None
        self.key = SpikeLinear(c, c, binary_input=sd)
        self.value = SpikeLinear(c, c, binary_input=sd)
        self.receptance = SpikeLinear(c, c, binary_input=sd)
        self.time_decay = nn.Parameter(torch.empty(c))
        self.time_first = nn.Parameter(torch.empty(c))
        self.out_neuron = LIF(config, c) if sd else None
        self.output = SpikeLinear(c, c, binary_input=sd)
        self.state_key = ""

    def forward(self, h, state, steps, want_attn):
        """h [B, L*T, C] (LayerNorm output) -> (out [B, L*T, C], implied attention [B, H, L, L] or None)."""
        xk, xv, xr = self.shift(h, state, steps, self.in_neuron).chunk(3, -1)
        k, v = to_mixer(self.key(xk), steps), to_mixer(self.value(xv), steps)
        prev = state.get(self.state_key) if state is not None else None
        y, new_state = wkv(self.time_decay, self.time_first, k, v, prev)
        if state is not None:
            state.set(self.state_key, new_state)
        gated = _gate(self.receptance(xr), to_steps(y, steps), self.out_neuron, state)
        attn = _mean_over_steps(self.implied_attention(k), steps) if want_attn else None
        return self.output(gated), attn

    def implied_attention(self, k: torch.Tensor) -> torch.Tensor:
        """The weights the WKV puts on each earlier token, averaged over each head's channels.

        k [B', L, C] -> [B', H, L, L], rows sum to 1 (tokens of this call only, not an earlier state).
        Each head's map goes through a per-channel softmax over [B', L, L, C/H]; with gradients on, that is
        recomputed in the backward (activation checkpointing) instead of kept: autograd would otherwise keep
        L^2 x C floats per row and layer (0.5 GB at L = 512, C = 512), against L^2 x H for the maps themselves.
        """
        length = k.shape[1]
        t = torch.arange(length, device=k.device, dtype=torch.float32)
        dist = (t[:, None] - 1 - t[None, :])[None, :, :, None]  # query t, key i: t - 1 - i
        diag = torch.eye(length, device=k.device, dtype=torch.bool)[None, :, :, None]
        future = (t[None, :] > t[:, None])[None, :, :, None]
        maps = []
        for kh, w, u in zip(
            k.float().chunk(self.n_head, -1),
            torch.exp(self.time_decay.float()).chunk(self.n_head),
            self.time_first.float().chunk(self.n_head),
        ):
            if torch.is_grad_enabled():
                maps.append(checkpoint(_head_attention, kh, w, u, dist, diag, future, use_reentrant=False))
            else:
                maps.append(_head_attention(kh, w, u, dist, diag, future))
        return torch.stack(maps, 1).to(k.dtype)


def _head_attention(kh, w, u, dist, diag, future) -> torch.Tensor:
    """One head's implied attention: softmax over keys of k_i + (u on the diagonal, else -(t-1-i) w) per
    channel, future keys masked, averaged over the head's channels. kh [B', L, D] -> [B', L, L]."""
    logits = kh[:, None] + torch.where(diag, u, -dist * w)
    return torch.softmax(logits.masked_fill(future, float("-inf")), dim=2).mean(-1)


class SpikingSelfAttention(nn.Module):
    """BiSpikCLM's softmax-free spiking attention (linear=False) or its linear-attention form (linear=True).

    Q, K, V are LIF spikes of the projections; sfsa fires a binary map A = spike((Q K^T) ⊙ M - theta) and
    returns the integer counts A V; sfsa_linear returns ((Q K^T) ⊙ M) V. spike_driven: a LIF before the
    projections and one on the counts, so W_q, W_k, W_v and W_o read spikes.
    """

    track_rate = True

    def __init__(self, config: SpikeGPTConfig, layer_id: int, linear: bool):
        super().__init__()
        c, sd = config.d_model, config.spike_driven
        self.layer_id, self.linear, self.n_head = layer_id, linear, config.n_head
        self.surrogate = {"surrogate": config.surrogate, "alpha": config.surrogate_alpha}
        self.in_neuron = LIF(config, c) if sd else None
        self.query = SpikeLinear(c, c, binary_input=sd)
        self.key = SpikeLinear(c, c, binary_input=sd)
        self.value = SpikeLinear(c, c, binary_input=sd)
        self.qkv_neuron = LIF(config, 3 * c)
        self.out_neuron = LIF(config, c) if sd else None
        self.output = SpikeLinear(c, c, binary_input=sd)
        self.register_buffer("threshold", torch.tensor(config.head_thresholds, dtype=torch.float32))
        self.state_key = ""
        self._attn_rate: torch.Tensor | None = None
        self._part_rates: dict[str, torch.Tensor] = {}

    def forward(self, h, state, steps, want_attn):
        """h [B, L*T, C] -> (out [B, L*T, C], attention [B, H, L, L_keys] averaged over T, or None)."""
        x = self.in_neuron(h, state) if self.in_neuron is not None else h
        qkv = self.qkv_neuron(torch.cat([self.query(x), self.key(x), self.value(x)], -1), state)
        q, k, v = (self._heads(to_mixer(part, steps)) for part in qkv.chunk(3, -1))
        if self.track_rate:
            self._part_rates = {"q": q.detach().mean(), "k": k.detach().mean(), "v": v.detach().mean()}
        prev = state.get(self.state_key) if state is not None else None
        if self.linear:
            out, new_state = sfsa_linear(q, k, v, prev)
            attn = self._linear_map(q, k) if want_attn else None
        else:
            out, attn, new_state = self._spiking_attention(q, k, v, prev)
        if state is not None:
            state.set(self.state_key, new_state)
        o = to_steps(out.transpose(1, 2).flatten(2), steps)
        if self.out_neuron is not None:
            o = self.out_neuron(o, state)
        attn = _mean_over_steps(attn, steps) if want_attn else None
        return self.output(o), attn

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        """[B', L, C] -> [B', H, L, D]."""
        return x.view(x.shape[0], x.shape[1], self.n_head, -1).transpose(1, 2)

    def _spiking_attention(self, q, k, v, cache):
        """Binary map over the cached keys and these; returns (A V, A [B', H, L, L_keys], new K/V cache)."""
        if cache is None:
            out, attn = sfsa(q, k, v, self.threshold, **self.surrogate)
            k_all, v_all, seen = k, v, 0
        else:
            # Queries after a cache see every cached key: the causal mask is shifted by the cache length.
            k_all, v_all = torch.cat([cache[0], k], 2), torch.cat([cache[1], v], 2)
            seen = cache[0].shape[2]
            mask = torch.ones(q.shape[2], k_all.shape[2], device=q.device, dtype=q.dtype).tril(seen)
            scores = (q @ k_all.transpose(-1, -2)) * mask
            attn = spike(scores - self.threshold.to(q.dtype).view(1, -1, 1, 1), **self.surrogate) * mask
            out = attn @ v_all
        if self.track_rate:
            length = q.shape[2]
            causal_entries = attn.shape[0] * attn.shape[1] * (length * seen + length * (length + 1) // 2)
            self._attn_rate = attn.detach().sum() / causal_entries
        return out, attn, (k_all, v_all)

    def _linear_map(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """The share of each key in sfsa_linear's output, [B', H, L, L] (tokens of this call): the integer
        scores (Q K^T) ⊙ M divided by their row sum, so rows sum to 1 (an all-zero row stays zero)."""
        mask = torch.ones(q.shape[2], q.shape[2], device=q.device, dtype=q.dtype).tril()
        scores = (q @ k.transpose(-1, -2)) * mask
        return scores / scores.sum(-1, keepdim=True).clamp_min(1.0)

    def part_rate(self, part: str) -> float | None:
        """Firing rate of the "q", "k" or "v" spikes in the last forward."""
        rate = self._part_rates.get(part)
        return None if rate is None else float(rate)

    @property
    def attention_rate(self) -> float | None:
        """Firing rate of the binary attention map over its causal entries (sfsa only)."""
        return None if self._attn_rate is None else float(self._attn_rate)


class SpikingFFN(nn.Module):
    """SpikeGPT's spiking receptance FFN: sigmoid(W_r xr) * W_v(relu(W_k xk)^2).

    spike_driven: LIF neurons after the token shift and on relu(W_k xk)^2, so all three Linears read spikes.
    """

    def __init__(self, config: SpikeGPTConfig, layer_id: int):
        super().__init__()
        c, hidden, sd = config.d_model, config.ffn_hidden, config.spike_driven
        self.layer_id = layer_id
        self.shift = TokenShift(c, 2, "ffn", layer_id)
        self.in_neuron = LIF(config, 2 * c) if sd else None
        self.key = SpikeLinear(c, hidden, binary_input=sd)
        self.receptance = SpikeLinear(c, c, binary_input=sd)
        self.hidden_neuron = LIF(config, hidden) if sd else None
        self.value = SpikeLinear(hidden, c, binary_input=sd)

    def forward(self, h: torch.Tensor, state: SpikeGPTState | None, steps: int, neuron: LIF | None = None):
        """h [B, L*T, C] (LayerNorm output) -> [B, L*T, C], or its spikes through `neuron` (fused with the gate)."""
        xk, xr = self.shift(h, state, steps, self.in_neuron).chunk(2, -1)
        if self.hidden_neuron is not None:
            hidden = self.hidden_neuron.fed_by(relu_square_lif, self.key(xk), state=state)
        else:
            hidden = relu_square_lif(self.key(xk))[0]
        return _gate(self.receptance(xr), self.value(hidden), neuron, state)


class SpikeGPTBlock(nn.Module):
    """x = x + LIF(mixer(LN1(x))); x = x + LIF(SRFFN(LN2(x))), all in the steps layout [B, L*T, C]."""

    def __init__(self, config: SpikeGPTConfig, layer_id: int):
        super().__init__()
        c, kind = config.d_model, config.layer_mixers[layer_id]
        self.kind = kind
        self.ln1 = nn.LayerNorm(c, eps=config.layer_norm_eps)
        if kind == "srwkv":
            self.mixer = SpikingRWKV(config, layer_id)
        else:
            self.mixer = SpikingSelfAttention(config, layer_id, linear=kind == "sfsa_linear")
        self.mixer_neuron = LIF(config, c)
        self.ln2 = nn.LayerNorm(c, eps=config.layer_norm_eps)
        self.ffn = SpikingFFN(config, layer_id)
        self.ffn_neuron = LIF(config, c)

    def forward(self, x, state, steps, want_attn):
        """x [B, L*T, C] -> (x [B, L*T, C], attention map or None)."""
        mixed, attn = self.mixer(self.ln1(x), state, steps, want_attn)
        x = x + self.mixer_neuron(mixed, state)
        x = x + self.ffn(self.ln2(x), state, steps, neuron=self.ffn_neuron)
        return x, attn
