"""The ANN baseline matched to a spiking student: a transformers Llama of the same width, depth and vocabulary.

Same d_model, n_layer, n_head and vocabulary as the SpikeGPT config; its SwiGLU MLP gets the student FFN's
hidden size (ffn_mult x d_model), so both have three d_model x hidden-sized matrices per layer, and its
attention has the four d_model x d_model projections of the student's token mixer. Nothing spikes: it is the
"what would a plain LM of this size learn from the same tokens" reference of the results study.
"""
from __future__ import annotations

from .config import SpikeGPTConfig


def matched_llama_config(config: SpikeGPTConfig, max_position: int = 2048):
    """A LlamaConfig with the student's width, depth, heads, FFN hidden size, vocabulary and tying."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=config.vocab_size,
        hidden_size=config.d_model,
        intermediate_size=config.ffn_mult * config.d_model,
        num_hidden_layers=config.n_layer,
        num_attention_heads=config.n_head,
        num_key_value_heads=config.n_head,
        max_position_embeddings=max(max_position, config.max_position or 0),
        rms_norm_eps=config.layer_norm_eps,
        initializer_range=config.initializer_range,
        tie_word_embeddings=config.tie_word_embeddings,
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
    )


def matched_llama(config: SpikeGPTConfig, max_position: int = 2048):
    """A freshly initialised LlamaForCausalLM matched to `config` (see matched_llama_config)."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM(matched_llama_config(config, max_position))
