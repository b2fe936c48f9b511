"""SpikeGPTConfig: one config for the spiking student, with named presets (like litgpt's Config.from_name)."""
from __future__ import annotations

from transformers import PretrainedConfig


class StudentError(ValueError):
    """Any error raised by the students package (a bad config, an unsupported call)."""


TOKEN_MIXERS = ("srwkv", "sfsa", "sfsa_linear")
LIF_RESETS = ("hard", "soft")
SURROGATES = ("atan", "sigmoid")

# Sizes only; the caller sets the vocabulary (the teacher's tokenizer decides it).
PRESETS: dict[str, dict] = {
    "tiny": {"n_layer": 2, "d_model": 32, "n_head": 2, "vocab_size": 128},
    "demo": {"n_layer": 4, "d_model": 128, "n_head": 4},
    "46m": {"n_layer": 12, "d_model": 512, "n_head": 8, "vocab_size": 5458},
    "216m": {"n_layer": 18, "d_model": 768, "n_head": 12, "vocab_size": 50277},
}


class SpikeGPTConfig(PretrainedConfig):
    """Configuration of `SpikeGPTForCausalLM` (SpikeGPT with BiSpikCLM-style attention and time steps).

    token_mixer: one of TOKEN_MIXERS or a list of them, one per layer (hybrids).
    time_steps: T >= 1 simulation steps per token (T = 1 is SpikeGPT, T > 1 is BiSpikCLM).
    spike_driven: every Linear reads a binary spike tensor (spiking neurons between LayerNorms and Linears).
    sfsa_threshold: threshold of the stateless neuron on Q K^T, a float or one float per head, > 0.
    max_position: longest context supported; 0 or None = unbounded (recurrent mixers).
    """

    model_type = "spikegpt"

    vocab_size: int = 50277
    n_layer: int = 12
    d_model: int = 512
    n_head: int = 8
    ffn_mult: int = 4
    token_mixer: str | list = "srwkv"
    time_steps: int = 1
    spike_driven: bool = True
    binary_embedding: bool = True
    lif_tau: float = 2.0
    lif_threshold: float = 1.0
    lif_reset: str = "hard"
    lif_detach_reset: bool = False
    lif_decay_input: bool = True
    surrogate: str = "atan"
    surrogate_alpha: float = 2.0
    sfsa_threshold: float | list = 1.0
    max_position: int | None = 0
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    bos_token_id: int | None = 0
    eos_token_id: int | list[int] | None = 0  # generation stops at any of them
    use_cache: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self._validate()

    @property
    def hidden_size(self) -> int:
        return self.d_model

    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    @property
    def num_attention_heads(self) -> int:
        return self.n_head

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def ffn_hidden(self) -> int:
        return self.ffn_mult * self.d_model

    @property
    def layer_mixers(self) -> list[str]:
        """The token mixer of each layer, length n_layer."""
        if isinstance(self.token_mixer, str):
            return [self.token_mixer] * self.n_layer
        return list(self.token_mixer)

    @property
    def head_thresholds(self) -> list[float]:
        """The SFSA threshold of each head, length n_head."""
        if isinstance(self.sfsa_threshold, (int, float)):
            return [float(self.sfsa_threshold)] * self.n_head
        return [float(t) for t in self.sfsa_threshold]

    @classmethod
    def from_preset(cls, name: str, **overrides) -> SpikeGPTConfig:
        """A named preset ("tiny", "demo", "46m", "216m") with keyword overrides, e.g. vocab_size=49152."""
        if name not in PRESETS:
            raise StudentError(f"SpikeGPTConfig preset must be one of {sorted(PRESETS)}, got {name!r}")
        return cls(**{**PRESETS[name], **overrides})

    def _validate(self) -> None:
        def bad(field, allowed):
            raise StudentError(f"SpikeGPTConfig.{field}={getattr(self, field)!r} is invalid: {allowed}")

        for field in ("vocab_size", "n_layer", "d_model", "n_head", "ffn_mult"):
            if not isinstance(getattr(self, field), int) or getattr(self, field) < 1:
                bad(field, "must be a positive integer")
        if self.d_model % self.n_head:
            bad("d_model", f"must be divisible by n_head={self.n_head}")
        mixers = [self.token_mixer] if isinstance(self.token_mixer, str) else self.token_mixer
        if not isinstance(mixers, (list, tuple)) or any(m not in TOKEN_MIXERS for m in mixers):
            bad("token_mixer", f"allowed: one of {TOKEN_MIXERS} or a list of them, one per layer")
        if not isinstance(self.token_mixer, str) and len(mixers) != self.n_layer:
            bad("token_mixer", f"a per-layer list needs n_layer={self.n_layer} entries, got {len(mixers)}")
        if not isinstance(self.time_steps, int) or self.time_steps < 1:
            bad("time_steps", "must be an integer >= 1")
        if self.lif_reset not in LIF_RESETS:
            bad("lif_reset", f"allowed: {LIF_RESETS}")
        if self.surrogate not in SURROGATES:
            bad("surrogate", f"allowed: {SURROGATES}")
        for field in ("lif_threshold", "lif_tau", "surrogate_alpha"):
            if not getattr(self, field) > 0:
                bad(field, "must be > 0")
        if self.lif_tau < 1:
            bad("lif_tau", "must be >= 1 (the membrane decay is 1 - 1/tau)")
        thresholds = self.sfsa_threshold if isinstance(self.sfsa_threshold, (list, tuple)) else [self.sfsa_threshold]
        if len(thresholds) not in (1, self.n_head) or any(not t > 0 for t in thresholds):
            bad("sfsa_threshold", f"must be a float > 0 or a list of n_head={self.n_head} floats > 0")
        if self.max_position is not None and self.max_position < 0:
            bad("max_position", "must be >= 0 (0 or None = unbounded)")
