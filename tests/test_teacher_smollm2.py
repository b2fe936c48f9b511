"""Integration: the real bundled SmolLM2-135M-Instruct, converted from its GGUF into the safetensors cache.

The first run converts the GGUF (about 15-60 s depending on load) into $SPIKEDISTILL_CACHE (default
~/.cache/spikedistill), shared with the demo and later runs; afterwards loading takes a few seconds.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F

from teachers import load_teacher
from teachers.data import bundled_corpus, read_text, separator_id
from teachers.loading import _alias_gguf, cache_root, convert_gguf

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    return load_teacher("smollm2-135m")


def test_converted_once_into_a_safetensors_dir(smollm2):
    root = cache_root()
    converted = convert_gguf(_alias_gguf("smollm2-135m", root), root)
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config and (converted / "model.safetensors").is_file()
    assert (smollm2.num_layers, smollm2.hidden_size, smollm2.num_heads, smollm2.vocab_size) == (30, 576, 9, 49152)
    assert separator_id(smollm2.tokenizer, None) == ("<|endoftext|>", 0)


@pytest.mark.latest
def test_held_out_loss_is_far_below_uniform(smollm2):
    text = read_text(bundled_corpus()["persuasion"])[5000:7000]
    ids = smollm2.tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids[:, :256]
    o = smollm2(ids)
    loss = F.cross_entropy(o.logits[0, :-1].float(), ids[0, 1:]).item()
    assert loss < 0.45 * math.log(smollm2.vocab_size), loss  # uniform would be log(49152) = 10.8 nats
    assert len(o.hidden_states) == 30 and o.embeddings.shape == (1, ids.shape[1], 576)
    assert torch.isfinite(o.logits).all()
