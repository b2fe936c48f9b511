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
