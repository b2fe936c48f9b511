"""Teacher outputs on tiny random Llama, Gemma3, GPT-2, OPT and Qwen2 models built here."""

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from teachers import load_teacher

V, H, HEADS, LAYERS = 320, 32, 4, 3


def _build(arch: str):
    torch.manual_seed(0)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=64,
                                            num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                            num_key_value_heads=2, max_position_embeddings=128))
    if arch == "gemma3":
        return Gemma3ForCausalLM(Gemma3TextConfig(vocab_size=V, hidden_size=H, intermediate_size=64,
                                                  num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                                  num_key_value_heads=1, head_dim=8, sliding_window=4,
                                                  final_logit_softcapping=5.0, max_position_embeddings=128))
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_embd=H, n_layer=LAYERS, n_head=HEADS, n_positions=128))
    if arch == "opt":
        return OPTForCausalLM(OPTConfig(vocab_size=V, hidden_size=H, ffn_dim=64, num_hidden_layers=LAYERS,
                                        num_attention_heads=HEADS, max_position_embeddings=128,
                                        word_embed_proj_dim=H))
    return Qwen2ForCausalLM(Qwen2Config(vocab_size=V, hidden_size=H, intermediate_size=64,
                                        num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                                        num_key_value_heads=2, max_position_embeddings=128))


ARCHS = ["llama", "gemma3", "gpt2", "opt", "qwen2"]


@pytest.fixture(scope="module")
def arch_dirs(tmp_path_factory, tiny_tokenizer):
    dirs = {}
    for arch in ARCHS:
        d = tmp_path_factory.mktemp(arch)
        _build(arch).save_pretrained(d)
        tiny_tokenizer.save_pretrained(d)
        dirs[arch] = d
    return dirs


@pytest.mark.parametrize("arch", ARCHS)
def test_outputs_match_the_hf_model(arch, arch_dirs, tmp_path):
    teacher = load_teacher(arch_dirs[arch], attn_maps=True, cache_dir=tmp_path)
    ref = AutoModelForCausalLM.from_pretrained(arch_dirs[arch], attn_implementation="eager").eval()
    ids = torch.randint(1, V, (2, 9), generator=torch.Generator().manual_seed(1))
    o = teacher(ids)
    with torch.no_grad():
        r = ref(ids, output_hidden_states=True, output_attentions=True)
    assert (teacher.num_layers, teacher.hidden_size, teacher.num_heads, teacher.vocab_size) == (LAYERS, H, HEADS, V)
    assert o.logits.shape == (2, 9, V)
    torch.testing.assert_close(o.logits, r.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(teacher.head(o.last_hidden_state), o.logits)
    assert len(o.hidden_states) == LAYERS and all(h.shape == (2, 9, H) for h in o.hidden_states)
    # HF's hidden_states = (input of layer 0, ..., output of the last layer after the final norm):
    # everything but that last entry is unambiguous and must match ours.
    torch.testing.assert_close(o.embeddings, r.hidden_states[0])
    for i in range(LAYERS - 1):
        torch.testing.assert_close(o.hidden_states[i], r.hidden_states[i + 1])
    assert len(o.attentions) == LAYERS
    for a in o.attentions:
        assert a.shape == (2, HEADS, 9, 9)
        torch.testing.assert_close(a.sum(-1), torch.ones(2, HEADS, 9))
        assert a.triu(1).abs().max() == 0  # causal
    assert not any(p.requires_grad for p in teacher.model.parameters()) and not teacher.model.training
    assert o.logits.grad_fn is None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_fast_path_has_no_attentions_and_same_logits(arch, arch_dirs, tmp_path):
    eager = load_teacher(arch_dirs[arch], attn_maps=True, cache_dir=tmp_path)
    fast = load_teacher(arch_dirs[arch], cache_dir=tmp_path)
    assert fast.model.config._attn_implementation == "sdpa"
    assert eager.model.config._attn_implementation == "eager"
    ids = torch.randint(1, V, (1, 7), generator=torch.Generator().manual_seed(2))
    o = fast(ids)
    assert o.attentions is None
    torch.testing.assert_close(o.logits, eager(ids).logits, atol=1e-5, rtol=1e-5)
    skipped = fast(ids, logits=False, hidden_states=False)
    assert skipped.logits is None and skipped.hidden_states is None
    torch.testing.assert_close(fast.head(skipped.last_hidden_state), o.logits)


def test_right_padding_does_not_change_real_positions(arch_dirs, tmp_path):
    teacher = load_teacher(arch_dirs["llama"], cache_dir=tmp_path)
    ids = torch.randint(1, V, (1, 6), generator=torch.Generator().manual_seed(3))
    padded = torch.cat([ids, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    mask = torch.cat([torch.ones(1, 6), torch.zeros(1, 3)], dim=1).long()
    torch.testing.assert_close(teacher(padded, attention_mask=mask).logits[:, :6], teacher(ids).logits,
                               atol=1e-5, rtol=1e-5)


def test_bf16_teacher_is_close_to_fp32(arch_dirs, tmp_path):
    fp32 = load_teacher(arch_dirs["llama"], cache_dir=tmp_path)
    bf16 = load_teacher(arch_dirs["llama"], dtype="bf16", cache_dir=tmp_path)
    assert bf16.dtype == torch.bfloat16 and bf16.fingerprint == fp32.fingerprint
    ids = torch.randint(1, V, (1, 8), generator=torch.Generator().manual_seed(4))
    p, q = (torch.log_softmax(t(ids).logits.float(), -1) for t in (fp32, bf16))
    assert torch.nn.functional.kl_div(q, p, log_target=True, reduction="batchmean") < 1e-2
