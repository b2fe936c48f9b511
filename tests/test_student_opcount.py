"""op_counts: hand-checked on tiny configs, and the matmul rows cross-checked against a real forward."""
import pytest
import torch

from students import SpikeGPTConfig, SpikeGPTForCausalLM, SpikeLinear


def tiny(mixer, steps, spike_driven) -> SpikeGPTForCausalLM:
    torch.manual_seed(0)
    cfg = SpikeGPTConfig(vocab_size=8, n_layer=1, d_model=4, n_head=2, ffn_mult=2, token_mixer=mixer,
                         time_steps=steps, spike_driven=spike_driven)
    return SpikeGPTForCausalLM(cfg).eval()


# C = 4, F = 8, V = 8, T = 1, spike-driven srwkv: computed by hand from the conventions in students/opcount.py.
SRWKV_SPIKE_DRIVEN = {
    "emb.spike": 4, "ln0": 24, "blocks.0.ln1": 24,
    "blocks.0.mixer.shift": 7 * 4, "blocks.0.mixer.in_neuron": 6 * 12,
    "blocks.0.mixer.key": 16, "blocks.0.mixer.value": 16, "blocks.0.mixer.receptance": 16,
    "blocks.0.mixer.wkv": 23 * 4, "blocks.0.mixer.gate": 16, "blocks.0.mixer.out_neuron": 24,
    "blocks.0.mixer.output": 16, "blocks.0.mixer_neuron": 24, "blocks.0.residual1": 4, "blocks.0.ln2": 24,
    "blocks.0.ffn.shift": 5 * 4, "blocks.0.ffn.in_neuron": 6 * 8, "blocks.0.ffn.key": 32,
    "blocks.0.ffn.receptance": 16, "blocks.0.ffn.relu_square": 16, "blocks.0.ffn.hidden_neuron": 48,
    "blocks.0.ffn.value": 32, "blocks.0.ffn.gate": 16, "blocks.0.ffn_neuron": 24, "blocks.0.residual2": 4,
    "ln_out": 24, "head_neuron": 24, "lm_head": 32,
}

# C = 4, H = 2, F = 8, V = 8, T = 2, released layout (spike_driven=False) sfsa at context 5: a query sees
# (5 + 1) / 2 = 3 keys on average.
SFSA_FLOAT_T2_CTX5 = {
    "emb.spike": 4, "ln0": 24, "blocks.0.ln1": 48,
    "blocks.0.mixer.query": 32, "blocks.0.mixer.key": 32, "blocks.0.mixer.value": 32,
    "blocks.0.mixer.qkv_neuron": 6 * 12 * 2, "blocks.0.mixer.scores": 4 * 3 * 2,
    "blocks.0.mixer.attn_neuron": 2 * 3 * 2, "blocks.0.mixer.attn_values": 4 * 3 * 2,
    "blocks.0.mixer.output": 32, "blocks.0.mixer_neuron": 48, "blocks.0.residual1": 8, "blocks.0.ln2": 48,
    "blocks.0.ffn.shift": 40, "blocks.0.ffn.key": 64, "blocks.0.ffn.receptance": 32,
    "blocks.0.ffn.relu_square": 32, "blocks.0.ffn.value": 64, "blocks.0.ffn.gate": 32,
    "blocks.0.ffn_neuron": 48, "blocks.0.residual2": 8, "ln_out": 48, "mean_over_steps": 8, "lm_head": 32,
}


def test_srwkv_spike_driven_by_hand():
    model = tiny("srwkv", 1, True)
    model(torch.randint(0, 8, (3, 6)))
    rows = model.op_counts(context_length=6)
    assert {r["name"]: r["ops"] for r in rows} == SRWKV_SPIKE_DRIVEN
    by_name = {r["name"]: r for r in rows}
    matmuls = [r for r in rows if r["kind"] == "matmul"]
    assert all(r["binary_operand"] for r in matmuls)  # T = 1: even the head reads spikes
    assert by_name["blocks.0.mixer.key"]["rate"] == model.blocks[0].mixer.key.input_rate
    assert by_name["lm_head"]["rate"] == model.lm_head.input_rate
    assert {r["kind"] for r in rows if r["name"].endswith(("ln0", "ln1", "ln2", "ln_out"))} == {"norm"}
    assert all(r["rate"] is None for r in rows if not r["binary_operand"])
    assert model.op_counts(6) == model.op_counts(600)  # recurrent: no term grows with the context


def test_sfsa_released_layout_two_steps_by_hand():
    model = tiny("sfsa", 2, False)
    model(torch.randint(0, 8, (3, 5)))
    rows = model.op_counts(context_length=5)
    assert {r["name"]: r["ops"] for r in rows} == SFSA_FLOAT_T2_CTX5
    binary = {r["name"]: r["rate"] for r in rows if r["binary_operand"]}
    mixer = model.blocks[0].mixer
    assert binary == {"blocks.0.mixer.scores": mixer.part_rate("q"), "blocks.0.mixer.attn_values": mixer.attention_rate}
    assert all(r["layer"] == 0 for r in rows if r["name"].startswith("blocks.0"))


def test_sfsa_linear_is_context_independent():
    model = tiny("sfsa_linear", 1, True)
    model(torch.randint(0, 8, (2, 5)))
    rows = {r["name"]: r for r in model.op_counts(5)}
    assert rows["blocks.0.mixer.state_update"]["ops"] == 4 * 2  # C * D
    assert rows["blocks.0.mixer.readout"]["ops"] == 4 * 2
    assert rows["blocks.0.mixer.readout"]["rate"] == model.blocks[0].mixer.part_rate("q")
    assert model.op_counts(5) == model.op_counts(5000)


@pytest.mark.parametrize("steps", [1, 3])
@pytest.mark.parametrize("mixer", ["srwkv", "sfsa", "sfsa_linear"])
def test_linear_ops_match_a_real_forward(mixer, steps):
    model = tiny(mixer, steps, True)
    macs: dict[str, int] = {}
    for name, m in model.named_modules():
        if isinstance(m, SpikeLinear):
            m.register_forward_hook(
                lambda mod, args, out, name=name: macs.__setitem__(name, args[0].numel() * mod.out_features)
            )
    batch, length = 2, 7
    model(torch.randint(0, 8, (batch, length)))
    counted = {r["name"]: r["ops"] for r in model.op_counts(length) if r["name"] in macs}
    assert counted == {name: n / (batch * length) for name, n in macs.items()}
