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


CHAT_TRAIN_TEXT = "Once a bee met a cat and a bat. " * 8 + " a b c d" * 20


def chat_tokenizer():
    """A byte-level BPE tokenizer (vocab 300) with the bundled teacher's special tokens at its ids:
    "<|endoftext|>" 0 (the document separator), "<|im_start|>" 1 (BOS), "<|im_end|>" 2 (EOS and pad); " a",
    " b", " c", " d" are single tokens. It adds no BOS itself."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([CHAT_TRAIN_TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|im_end|>"
    )


def chain_student(vocab_size: int, next_token: dict[int, int]):
    """A 1-layer student whose greedy next token depends only on the current one: next_token[t] after t.

    Hand-set: the embedding is the identity (d_model = vocab_size), the block's two output Linears are zero (its
    LIFs never fire, so the residual stream is ln0 of the embedding), and the head row of next_token[t] is
    10 x the head input of t over its squared norm: logit 10 for the chosen token against ~1/vocab_size for
    the others (the head inputs of two tokens are nearly orthogonal). Tokens without an entry get near-equal
    logits. Float (spike_driven=False, binary_embedding=False), in eval mode."""
    from students import SpikeGPTConfig, SpikeGPTForCausalLM

    cfg = SpikeGPTConfig(vocab_size=vocab_size, n_layer=1, d_model=vocab_size, n_head=1, spike_driven=False,
                         binary_embedding=False)
    model = SpikeGPTForCausalLM(cfg).eval()
    with torch.no_grad():
        model.emb.weight.copy_(torch.eye(vocab_size))
        model.blocks[0].mixer.output.weight.zero_()
        model.blocks[0].ffn.value.weight.zero_()
        head_input = model.ln_out(model.ln0(model.emb.weight))  # [V, V]: row t is the head input after token t
        model.lm_head.weight.zero_()
        for token, chosen in next_token.items():
            model.lm_head.weight[chosen] += 10 * head_input[token] / head_input[token].square().sum()
    return model
