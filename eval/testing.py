"""Tiny, seeded spiking students for eval's tests and examples (random weights; never for real results)."""

from __future__ import annotations

from pathlib import Path

import torch


def tiny_student(vocab_size: int, seed: int = 0, **overrides):
    """A random 2-layer, 32-wide SpikeGPT student (srwkv unless overridden) in eval mode.

    The LIF threshold is lowered to 0.2 so that a random network spikes enough to give distinct logits
    (at 1.0 most random heads stay silent and every logit ties)."""
    from students import SpikeGPTConfig, SpikeGPTForCausalLM

    torch.manual_seed(seed)
    cfg = SpikeGPTConfig(
        **{"vocab_size": vocab_size, "n_layer": 2, "d_model": 32, "n_head": 2, "lif_threshold": 0.2}
        | overrides
    )
    return SpikeGPTForCausalLM(cfg).eval()


def save_model_dir(model, tokenizer, path) -> Path:
    """Save model (safetensors) and tokenizer into `path`, as the export stage does; returns the path."""
    path = Path(path)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


BOS_TRAIN_TEXT = (
    "The lamps were lit early and the road grew soft. It is a truth universally acknowledged, that a single "
    "man in possession of a good fortune, must be in want of a wife. To be, or not to be, that is the question."
)


def bos_tokenizer():
    """A byte-level BPE tokenizer (vocab 300) that adds BOS itself, as Llama and Gemma tokenizers do:
    "<|endoftext|>" is id 0 (EOS, pad), "<s>" is id 1 (BOS), and `encode(text)` returns [1, ...]."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([BOS_TRAIN_TEXT] * 4, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|endoftext|>", pad_token="<|endoftext|>"
    )


def tiny_llama(vocab_size: int, seed: int = 0, **overrides):
    """A random 2-layer, 32-wide Llama (4 heads, 2 KV heads) in eval mode, BOS id 1 and EOS id 0."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        **{"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256,
           "bos_token_id": 1, "eos_token_id": 0, "pad_token_id": 0, "tie_word_embeddings": False}
        | overrides
    )
    return LlamaForCausalLM(cfg).eval()
