"""SpikeGPTForCausalLM: the spiking student as a HuggingFace causal LM (parallel and recurrent forms)."""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init

from .config import SpikeGPTConfig, StudentError
from .layers import LIF, SpikeGPTBlock, SpikeLinear, SpikingRWKV, SpikingSelfAttention, TokenShift
from .opcount import count_ops
from .ops import fused_decoder, linear_cross_entropy, spike
from .outputs import CACHE_FIELD, SpikeGPTCausalLMOutput, cache_kwargs, one_cache, state_of
from .state import SpikeGPTState

IGNORE_INDEX = -100  # label of a position that carries no loss (transformers' and PyTorch's convention)


class SpikeGPTPreTrainedModel(PreTrainedModel):
    config_class = SpikeGPTConfig
    config: SpikeGPTConfig
    base_model_prefix = "spikegpt"
    main_input_name = "input_ids"
    _no_split_modules: ClassVar[list[str]] = ["SpikeGPTBlock"]
    _is_stateful = True
    # WKV decay and bonus stay fp32 under bf16/fp16 loading (the WKV runs in fp32; exp(w) needs the precision).
    _keep_in_fp32_modules_strict: ClassVar[list[str]] = ["time_decay", "time_first"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """HF init hook (runs per module; skips weights loaded from a checkpoint). See `_linear_init_std`."""
        if isinstance(module, SpikeLinear):
            init.normal_(module.weight, mean=0.0, std=_linear_init_std(self, module))
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            # In spike-driven mode every LayerNorm but ln0 feeds LIF neurons: its gain is their input current
            # (ln0, which feeds the residual stream, gets the same gain for simplicity).
            init.constant_(module.weight, lif_current(self.config) if self.config.spike_driven else 1.0)
            init.zeros_(module.bias)
        elif isinstance(module, SpikingRWKV):
            _init_decay(module, self.config)
        elif isinstance(module, TokenShift):
            init.copy_(module.mix, _shift_curves(module, self.config))
        elif isinstance(module, SpikingSelfAttention):
            init.copy_(module.threshold, torch.tensor(self.config.head_thresholds))
        elif isinstance(module, LIF):
            pass  # no parameters
        else:
            super()._init_weights(module)


# Initialisation: every LIF fires at init (a silent neuron passes nothing forward and gets no gradient through
# the Linear it feeds). Each Linear's std is chosen so that its output has a target std given the rms of what
# it reads, assuming the spikes it reads fire at INIT_SPIKE_RATE. The constants are measured at init on held-out
# English text (tests/test_student_model.py::test_every_neuron_fires_at_init_and_every_block_counts).
INIT_SPIKE_RATE = 0.15
# rms of sigmoid(r) for r ~ N(0, 1), and of the WKV's decay-weighted average of v relative to v itself
_GATE_RMS, _WKV_RMS = 0.54, 0.67
# rms of relu(z)^2 for z ~ N(0, 1): sqrt(E[z^4] / 2)
_RELU2_RMS = math.sqrt(1.5)
# sfsa / sfsa_linear: Q and K get a weaker current than other LIFs (they fire ~2-4% at init), so that the
# attention's integer counts (A V, or (Q K^T) V) stay of order one over a few hundred keys instead of growing
# past every threshold; V fires like any other LIF. The current shrinks slowly with the head width D (the
# number of Q K^T coincidences grows with D): x (32 / D)^(1/8).
_QK_CURRENT = 0.475
# sd=False sfsa: rms of the counts W_o reads (A V or (Q K^T) V), measured at 256 tokens
_COUNT_RMS = 1.0


def membrane_gain(config: SpikeGPTConfig, steps: int) -> float:
    """Membrane of a LIF at rest after `steps` steps of unit input current (no spike): c (1 - beta^n) / (1 - beta)
    with beta = 1 - 1/tau and c = 1/tau (decay_input) or 1. SpikeGPT's LIF (tau 2): 0.5 after one step."""
    beta = 1.0 - 1.0 / config.lif_tau
    c = 1.0 / config.lif_tau if config.lif_decay_input else 1.0
    return c * (1.0 - beta**steps) / (1.0 - beta)


def lif_current(config: SpikeGPTConfig) -> float:
    """Std of the input current each LIF gets at init: threshold / (g_1^(3/4) g_T^(1/4)), g_n = membrane_gain(n).

    At T = 1 this is threshold / g_1 (2 for SpikeGPT's LIF: one std reaches the threshold in one step), and the
    neurons fire ~10-20% of the time on text. With T > 1 steps per token a LIF integrates the same input T times,
    so the current is lowered a quarter of the way (on a log scale) towards threshold / g_T; the full correction
    over-shoots through the cascade of layers, since at T = 1 the membrane already integrates across tokens.
    """
    g_1, g_t = membrane_gain(config, 1), membrane_gain(config, config.time_steps)
    return config.lif_threshold / (g_1**0.75 * g_t**0.25)


def _linear_init_std(model: nn.Module, linear: SpikeLinear) -> float:
    """Std of a SpikeLinear's initial weights: target output std / (sqrt(in_features) * rms of its input).

    The head is LeCun (logits of std <= 1). Every Linear that feeds a LIF (directly, or through the sigmoid
    gate, the WKV average, or relu^2) targets `lif_current` at that LIF; srwkv's key and receptance, and the
    key of the sd=False FFN, target unit std (the WKV weights and the sigmoid gates work at that scale).
    """
    config = model.config
    owner, name = next((m, n) for m in model.modules() for n, c in m.named_children() if c is linear)
    if owner is model:
        return 1.0 / math.sqrt(linear.in_features)
    sd, current = config.spike_driven, lif_current(config)
    spikes = math.sqrt(INIT_SPIKE_RATE)
    floats = 1.0  # a LayerNorm output of gain 1 (sd=False)
    if isinstance(owner, SpikingRWKV):
        wkv_out = _GATE_RMS * _WKV_RMS  # rms of sigmoid(r) * wkv for v of unit std
        rms_and_std = {
            "key": (spikes if sd else floats, 1.0),
            "receptance": (spikes if sd else floats, 1.0),
            "value": (spikes, current / wkv_out) if sd else (floats, 1.0),
            "output": (spikes, current) if sd else (wkv_out, current),
        }
    elif isinstance(owner, SpikingSelfAttention):
        qk_current = _QK_CURRENT * current * (32 / config.head_dim) ** 0.125
        rms_and_std = {
            "query": (spikes if sd else floats, qk_current),
            "key": (spikes if sd else floats, qk_current),
            "value": (spikes if sd else floats, current),
            "output": (spikes, current) if sd else (_COUNT_RMS, current),
        }
    else:  # SpikingFFN: sigmoid(W_r x) * W_v(relu(W_k x)^2)
        rms_and_std = {
            "key": (spikes, math.sqrt(current / _RELU2_RMS)) if sd else (floats, 1.0),
            "receptance": (spikes if sd else floats, 1.0),
            "value": (spikes, current / _GATE_RMS) if sd else (_RELU2_RMS, current / _GATE_RMS),
        }
    rms, std = rms_and_std[name]
    return std / (math.sqrt(linear.in_features) * rms)


def _shift_curves(module: TokenShift, config: SpikeGPTConfig) -> torch.Tensor:
    """SpikeGPT / RWKV-4 token-shift init [branches, C]: mu = (i/C)^p with p falling from 1 to ~0 over depth."""
    width, layer, n = module.mix.shape[1], module.layer_id, config.n_layer
    curve = torch.arange(width, dtype=torch.float32, device=module.mix.device) / width
    ratio_0_to_1, ratio_1_to_0 = layer / max(n - 1, 1), 1.0 - layer / n
    mix_k = curve**ratio_1_to_0
    if module.owner == "ffn":
        return torch.stack([mix_k, mix_k])
    return torch.stack([mix_k, mix_k + 0.3 * ratio_0_to_1, curve ** (0.5 * ratio_1_to_0)])


def _init_decay(module: SpikingRWKV, config: SpikeGPTConfig) -> None:
    """SpikeGPT / RWKV-4 init of the WKV decay w (slow to fast over channels) and bonus u (log 0.3 + zigzag)."""
    width, ratio_0_to_1 = module.time_decay.numel(), module.layer_id / max(config.n_layer - 1, 1)
    h = torch.arange(width, dtype=torch.float32, device=module.time_decay.device) / max(width - 1, 1)
    init.copy_(module.time_decay, -5 + 8 * h ** (0.7 + 1.3 * ratio_0_to_1))
    zigzag = ((torch.arange(width, device=h.device) + 1) % 3 - 1).float() * 0.5
    init.copy_(module.time_first, math.log(0.3) + zigzag)


class SpikeGPTForCausalLM(SpikeGPTPreTrainedModel, GenerationMixin):
    """Binary embedding -> ln0 -> n_layer spiking blocks -> ln_out (-> LIF if spike_driven) -> mean over T -> head.

    The residual stream runs in the steps layout [B, L*T, C]; see layers.py.
    """

    _tied_weights_keys: ClassVar[dict[str, str]] = {"lm_head.weight": "emb.weight"}
    track_rate = True

    def __init__(self, config: SpikeGPTConfig):
        super().__init__(config)
        c = config.d_model
        self.emb = nn.Embedding(config.vocab_size, c)
        self.ln0 = nn.LayerNorm(c, eps=config.layer_norm_eps)
        self.blocks = nn.ModuleList(SpikeGPTBlock(config, i) for i in range(config.n_layer))
        self.ln_out = nn.LayerNorm(c, eps=config.layer_norm_eps)
        self.head_neuron = LIF(config, c) if config.spike_driven else None
        head_binary = config.spike_driven and config.time_steps == 1  # for T > 1 the head reads a spike rate
        self.lm_head = SpikeLinear(c, config.vocab_size, binary_input=head_binary)
        self._emb_rate: torch.Tensor | None = None
        self._fused = None  # the fused decode step (ops.fused_decoder), set inside `decoding()`
        for name, module in self.named_modules():
            if hasattr(module, "state_key"):
                module.state_key = name
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.emb

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.emb = value

    def get_output_embeddings(self) -> SpikeLinear:
        return self.lm_head

    def forward(
        self,
        input_ids: torch.LongTensor,
        labels: torch.LongTensor | None = None,
        output_hidden_states: bool | None = False,
        output_attentions: bool | None = False,
        cache: SpikeGPTState | None = None,
        use_cache: bool | None = False,
        skip_logits: bool | None = None,
        logits_to_keep: int = 0,
        attention_mask: torch.Tensor | None = None,
        return_dict: bool | None = True,
        past_key_values: SpikeGPTState | None = None,
        num_items_in_batch: torch.Tensor | int | None = None,
        **kwargs,
    ) -> SpikeGPTCausalLMOutput:
        """input_ids [B, L] -> SpikeGPTCausalLMOutput.

        labels [B, L]: the next-token cross-entropy (HF convention: labels = input_ids, shifted inside, so
            position t is scored against labels[:, t+1]; -100 ignored), the mean over the scored positions, or
            their sum / num_items_in_batch when that is given (transformers' Trainer passes the count of the
            whole accumulated batch, so gradient accumulation equals one large batch).
        skip_logits: whether to skip the [B, L, V] logits (Liger-Kernel's convention). None (default): skip them
            exactly when the model is in training mode and labels are given. True: logits=None; with labels the
            loss goes through the fused LM head + cross-entropy (`ops.linear_cross_entropy`: rows in chunks,
            the spike-aware head matmuls when the head input is binary), which never holds the logits; without
            labels only `head_input` is returned, for a caller that applies `lm_head` itself. False: the
            logits are computed (and the loss from them), as eval mode and generation do.
        cache: a SpikeGPTState from an earlier call with use_cache=True; the call continues it and updates it in
            place. `past_key_values` is accepted as its older name (transformers < 5.24); passing both raises.
        logits_to_keep: > 0 computes logits for the last that many tokens only (generation).
        Raises StudentError for labels that are not [B, L] token ids in [0, V) or -100, labels together with
        logits_to_keep > 0, padding in attention_mask, or a context beyond config.max_position.
        """
        past = one_cache(cache, past_key_values)
        self._check_call(input_ids, labels, logits_to_keep, past, attention_mask)
        if skip_logits is None:
            skip_logits = self.training and labels is not None
        steps, batch, length = self.config.time_steps, *input_ids.shape
        if self._fused is not None and past is not None and length == 1 and labels is None and not skip_logits \
                and not (output_hidden_states or output_attentions or torch.is_grad_enabled()):
            fused = self._fused_step(input_ids, past, use_cache)
            if fused is not None:
                return fused
        state = past if past is not None else (SpikeGPTState() if use_cache else None)
        emb = self.emb(input_ids)
        if self.config.binary_embedding:
            emb = spike(emb, self.config.surrogate, self.config.surrogate_alpha)
            if self.track_rate:
                self._emb_rate = emb.detach().mean()
        # Each token is presented T times: token-major, step-minor (steps layout).
        x = self.ln0(emb)
        x = x.repeat_interleave(steps, dim=1) if steps > 1 else x
        hidden, attentions = [emb] if output_hidden_states else None, [] if output_attentions else None
        for block in self.blocks:
            x, attn = block(x, state, steps, bool(output_attentions))
            if hidden is not None:
                hidden.append(x.view(batch, length, steps, -1).mean(2))
            if attentions is not None:
                attentions.append(attn)
        h = self.ln_out(x)
        if self.head_neuron is not None:
            h = self.head_neuron(h, state)
        head_input = h.view(batch, length, steps, -1).mean(2)
        if state is not None:
            state.seen_tokens += length
        logits = loss = None
        if not skip_logits:
            logits = self.lm_head(head_input[:, -logits_to_keep:] if logits_to_keep else head_input)
            if labels is not None:
                loss = shifted_cross_entropy(logits, labels, num_items_in_batch)
        elif labels is not None:
            loss = self._fused_loss(head_input, labels, num_items_in_batch)
        return SpikeGPTCausalLMOutput(
            loss=loss,
            logits=logits,
            hidden_states=tuple(hidden) if hidden is not None else None,
            attentions=tuple(attentions) if attentions is not None else None,
            head_input=head_input,
            **{CACHE_FIELD: state if use_cache else None},
        )

    def _fused_step(self, input_ids: torch.LongTensor, state: SpikeGPTState, use_cache: bool):
        """One decode step through the fused C step (students/ops/decode_step), or None where it does not run."""
        head_max_rate = self._fused.runs_for(input_ids.shape[0])
        result = None if head_max_rate is None else self._fused.step(input_ids, state, head_max_rate)
        if result is None:
            return None
        state.seen_tokens += 1
        logits, head_input = result
        return SpikeGPTCausalLMOutput(logits=logits, head_input=head_input, **{CACHE_FIELD: state if use_cache else None})

    def _fused_loss(self, head_input: torch.Tensor, labels: torch.Tensor, num_items_in_batch) -> torch.Tensor:
        """shifted_cross_entropy of the logits head_input [B, L, C] @ lm_head.weight^T, without holding them."""
        if self.lm_head.track_rate:
            self.lm_head.record_rate(head_input)
        x = head_input.reshape(-1, head_input.shape[-1])
        targets = next_token_targets(labels).reshape(-1)
        if num_items_in_batch is None:
            return linear_cross_entropy(x, self.lm_head.weight, targets)
        return linear_cross_entropy(x, self.lm_head.weight, targets, reduction="sum") / _on(num_items_in_batch, x)

    def _check_call(self, input_ids, labels, logits_to_keep, state, attention_mask) -> None:
        if input_ids.dim() != 2:
            raise StudentError(f"input_ids must be [B, L], got shape {tuple(input_ids.shape)}")
        if labels is not None:
            self._check_labels(input_ids, labels, logits_to_keep)
        if attention_mask is not None and not bool(attention_mask.all()):
            raise StudentError("attention_mask has padding: the student is recurrent; pass unpadded sequences")
        rows = state.batch_size if state is not None else -1
        if rows > 0 and rows != input_ids.shape[0]:
            raise StudentError(
                f"the recurrent state holds {rows} rows but input_ids has {input_ids.shape[0]}: pass the state of "
                "these rows (state.batch_select_indices(rows) keeps some, state.batch_repeat_interleave(n) "
                "repeats each)"
            )
        limit = self.config.max_position
        seen = state.seen_tokens if state is not None else 0
        if limit and seen + input_ids.shape[1] > limit:
            raise StudentError(
                f"context {seen + input_ids.shape[1]} exceeds config.max_position={limit}; "
                "raise max_position or shorten the input"
            )

    def _check_labels(self, input_ids, labels, logits_to_keep) -> None:
        if logits_to_keep > 0:
            raise StudentError("labels with logits_to_keep > 0: the loss needs every position's logits; drop one")
        if labels.shape != input_ids.shape:
            raise StudentError(
                f"labels must be [B, L] like input_ids {tuple(input_ids.shape)}, got {tuple(labels.shape)}"
            )
        vocab = self.config.vocab_size
        if bool(((labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab))).any()):
            raise StudentError(
                f"labels must be token ids in [0, {vocab}) or {IGNORE_INDEX} (ignored); check that the tokenizer "
                "matches the model's vocab_size"
            )

    def spike_rates(self) -> dict[str, float]:
        """Firing rate per spiking module (name -> mean spike) from the last forward.

        Keys: "emb" (binary embedding), each LIF's module name, and "<sfsa module>.attn" for binary attention
        maps (rate over causal entries only).
        """
        rates = {} if self._emb_rate is None else {"emb": float(self._emb_rate)}
        for name, module in self.named_modules():
            if isinstance(module, LIF) and module.firing_rate is not None:
                rates[name] = module.firing_rate
            elif isinstance(module, SpikingSelfAttention) and module.attention_rate is not None:
                rates[f"{name}.attn"] = module.attention_rate
        return rates

    @contextmanager
    def rates_paused(self):
        """Within this block forwards do not record firing rates (decode steps skip those reductions)."""
        modules = [m for m in self.modules() if hasattr(m, "track_rate")]
        for m in modules:
            m.track_rate = False
        try:
            yield
        finally:
            for m in modules:
                del m.track_rate  # back to the class default (True)

    @contextmanager
    def decoding(self):
        """Within this block forwards do not record firing rates, and a forward of one token per row that
        continues a state, without gradients, runs as one fused C call where the model allows it (a spike-driven
        srwkv student with T = 1 on CPU in fp32: students/ops/decode_step; SPIKEDISTILL_SPARSE=off keeps the module
        path). The weights are read on entry: do not change them inside. generate()'s greedy and sampling loops
        run inside it."""
        before = self._fused
        self._fused = fused_decoder(self)
        try:
            with self.rates_paused():
                yield
        finally:
            self._fused = before

    def op_counts(self, context_length: int) -> list[dict]:
        """Every op per token of a forward over `context_length` tokens (T steps included); see opcount.py."""
        return count_ops(self, context_length)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        """GenerationMixin: never build a key/value DynamicCache; the first forward creates a SpikeGPTState."""
        return False

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        cache: SpikeGPTState | None = None,
        past_key_values: SpikeGPTState | None = None,
        attention_mask: torch.Tensor | None = None,
        use_cache: bool = True,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ) -> dict:
        """GenerationMixin hook: feed only the tokens the recurrent state has not seen.

        input_ids [B, L] is the whole sequence so far: the prompt goes in once (prefill), then one token per step,
        so each new token costs O(1) for srwkv and sfsa_linear layers whatever the context length. A state passed
        in by the caller (`cache=`) continues from its `seen_tokens`. Raises StudentError for inputs_embeds, or
        when the state has already seen at least L tokens.
        """
        if inputs_embeds is not None:
            raise StudentError("generate(inputs_embeds=...) is not supported: the student reads token ids")
        state = one_cache(cache, past_key_values)
        seen = state.get_seq_length() if state is not None else 0
        if seen >= input_ids.shape[1]:
            raise StudentError(
                f"the cache has seen {seen} tokens but input_ids holds {input_ids.shape[1]}: pass the whole "
                "sequence (the tokens the cache has seen, then the new ones)"
            )
        inputs = {"input_ids": input_ids[:, seen:], "attention_mask": attention_mask, "use_cache": use_cache,
                  **cache_kwargs(state)}
        for key in ("logits_to_keep", "output_attentions", "output_hidden_states"):
            if kwargs.get(key) is not None:
                inputs[key] = kwargs[key]
        return inputs

    def _expand_inputs_for_generation(self, expand_size: int = 1, is_encoder_decoder: bool = False,
                                      input_ids: torch.LongTensor | None = None, **model_kwargs):
        """GenerationMixin hook that repeats each input row expand_size times (num_beams, num_return_sequences):
        a state passed in by the caller, one row per input row, is repeated with them (in place)."""
        state = one_cache(model_kwargs.get("cache"), model_kwargs.get("past_key_values"))
        if expand_size > 1 and state is not None and input_ids is not None and state.batch_size == len(input_ids):
            state.batch_repeat_interleave(expand_size)
        return super()._expand_inputs_for_generation(
            expand_size=expand_size, is_encoder_decoder=is_encoder_decoder, input_ids=input_ids, **model_kwargs
        )

    def generate(self, *args, **kwargs):
        """transformers' `GenerationMixin.generate`, unchanged but for the recurrent state after beam search.

        Beam search leaves the state holding its running beams, not the returned sequences (one per input row,
        or num_return_sequences per row, picked among the beams that finished); so the state it returns with
        return_dict_in_generate=True, and a state passed in as `cache`, are refilled from the returned
        sequences (one parallel forward over sequences[:, :-1]): continuing them equals the parallel forward on
        the whole text. A row that finished early is padded with pad_token_id, and its state reads that padding
        as the row does. Returns what `generate` returns.
        """
        out = super().generate(*args, **kwargs)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        states = (one_cache(kwargs.get("cache"), kwargs.get("past_key_values")), state_of(out))
        for state in {id(s): s for s in states if isinstance(s, SpikeGPTState) and s.holds_beams}.values():
            self._refill(state, sequences)
        return out

    @torch.no_grad()
    def _refill(self, state: SpikeGPTState, sequences: torch.LongTensor) -> None:
        """Make `state` the state after sequences[:, :-1] [B, L-1] (the last token is not fed yet, as after any
        `generate`), from one parallel forward; firing rates are not recorded."""
        state.reset()
        if sequences.shape[1] > 1:
            with self.rates_paused():
                self(sequences[:, :-1], use_cache=True, skip_logits=True, **cache_kwargs(state))

    @contextmanager
    def _optimize_model_for_decode(self):
        """GenerationMixin's decode-loop context (sampling and greedy search): `decoding()`, so decode steps do not
        record firing rates (spike_rates() after generate() describes the prompt) and take the fused step."""
        parent = getattr(super(), "_optimize_model_for_decode", None)
        with parent() if parent is not None else nullcontext(), self.decoding():
            yield


def next_token_targets(labels: torch.Tensor) -> torch.Tensor:
    """labels [B, L] -> targets [B, L]: position t is scored against labels[:, t+1]; the last position is -100.

    Shifting the labels, not the logits, spares a copy of [B, L, V] forward and backward."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def shifted_cross_entropy(logits: torch.Tensor, labels: torch.Tensor,
                          num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """Next-token cross-entropy of logits [B, L, V] against labels [B, L] (see `next_token_targets`; -100
    ignored): the mean over scored positions, or their sum / num_items_in_batch when that is given."""
    flat, targets = logits.reshape(-1, logits.shape[-1]).float(), next_token_targets(labels).reshape(-1)
    if num_items_in_batch is None:
        return F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX)
    summed = F.cross_entropy(flat, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return summed / _on(num_items_in_batch, summed)


def _on(count: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor | int:
    """num_items_in_batch on the device of `like` (Trainer may hand it over on another device)."""
    return count.to(like.device) if torch.is_tensor(count) else count
