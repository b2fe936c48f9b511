"""The spiking student: SpikeGPT with BiSpikCLM-style attention and time steps, as a HuggingFace causal LM.

`import students` registers the "spikegpt" model type with AutoConfig and AutoModelForCausalLM.
"""
from transformers import AutoConfig, AutoModelForCausalLM

from .baseline import matched_llama, matched_llama_config
from .config import PRESETS, TOKEN_MIXERS, SpikeGPTConfig, StudentError
from .layers import SpikeLinear
from .model import SpikeGPTForCausalLM, shifted_cross_entropy
from .outputs import CACHE_FIELD, SpikeGPTCausalLMOutput, cache_kwargs, state_of
from .state import SpikeGPTState

AutoConfig.register("spikegpt", SpikeGPTConfig, exist_ok=True)
AutoModelForCausalLM.register(SpikeGPTConfig, SpikeGPTForCausalLM, exist_ok=True)

__all__ = [
    "CACHE_FIELD",
    "PRESETS",
    "TOKEN_MIXERS",
    "SpikeGPTCausalLMOutput",
    "SpikeGPTConfig",
    "SpikeGPTForCausalLM",
    "SpikeGPTState",
    "SpikeLinear",
    "StudentError",
    "cache_kwargs",
    "matched_llama",
    "matched_llama_config",
    "shifted_cross_entropy",
    "state_of",
]
