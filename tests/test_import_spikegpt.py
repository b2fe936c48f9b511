"""`spikedistill import-spikegpt`: a synthetic checkpoint in ridgerchu/SpikeGPT's layout (src/model.py, class GPT,
model_type "RWKV") converts into our student, whose logits equal a from-scratch float64 forward written here from
SpikeGPT's equations; bad checkpoints are one error line naming the key, exit 2."""
from __future__ import annotations

import re

import pytest
import torch

from pipeline.cli import main

V, C, N = 40, 16, 3  # vocabulary, n_embd, n_layer


def spikegpt_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under SpikeGPT's own key names and shapes (written from src/model.py, not by our converter)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g) * scale + shift

    sd = {"emb.weight": rnd(V, C), "blocks.0.ln0.weight": rnd(C, scale=0.2, shift=1.0),
          "blocks.0.ln0.bias": rnd(C, scale=0.1)}
    for i in range(N):
        b = f"blocks.{i}."
        for ln in ("ln1", "ln2"):
            sd[b + f"{ln}.weight"], sd[b + f"{ln}.bias"] = rnd(C, scale=0.3, shift=1.5), rnd(C, scale=0.2)
        sd[b + "att.time_decay"] = rnd(C, scale=1.0)
        sd[b + "att.time_first"] = rnd(C, scale=0.5, shift=-1.0)
        for x in "kvr":
            sd[b + f"att.time_mix_{x}"] = torch.rand(1, 1, C, generator=g)
        for x in ("key", "value", "receptance", "output"):
            sd[b + f"att.{x}.weight"] = rnd(C, C, scale=C**-0.5 * (6 if x == "output" else 1))
        for x in "kr":
            sd[b + f"ffn.time_mix_{x}"] = torch.rand(1, 1, C, generator=g)
        sd[b + "ffn.key.weight"] = rnd(4 * C, C, scale=C**-0.5)
        sd[b + "ffn.receptance.weight"] = rnd(C, C, scale=C**-0.5)
        sd[b + "ffn.value.weight"] = rnd(C, 4 * C, scale=(4 * C) ** -0.5 * 3)
    sd["ln_out.weight"], sd["ln_out.bias"] = rnd(C, scale=0.2, shift=1.0), rnd(C, scale=0.1)
    sd["head.weight"] = rnd(V, C, scale=C**-0.5)
    return sd


def spikegpt_forward(sd: dict[str, torch.Tensor], idx: torch.Tensor, binary_embedding: bool = True) -> torch.Tensor:
    """SpikeGPT's GPT.forward from its equations, in float64, token by token: idx [L] -> logits [L, V].

    x = H(emb[idx]); x = LN0(x); per block: x += LIF1(TimeMix(LN1(x))); x += LIF2(ChannelMix(LN2(x)));
    logits = head(LN_out(x)). TimeMix: token shift xk = x*mu_k + x_prev*(1-mu_k) (same for v, r), WKV with decay
    exp(w) and bonus u, written as the explicit weighted average over all earlier tokens; sigmoid(r) * wkv; W_o.
    ChannelMix: sigmoid(W_r xr) * W_v(relu(W_k xk)^2). LIF: tau 2, threshold 1, hard reset to 0.
    """
    w = {k: v.double() for k, v in sd.items()}

    def ln(x, name):
        return torch.nn.functional.layer_norm(x, (C,), w[name + ".weight"], w[name + ".bias"], eps=1e-5)

    def shift(x, b, part):
        prev = torch.cat([torch.zeros(1, C, dtype=x.dtype), x[:-1]])
        mixed = {}
        for key in ("k", "v", "r") if part == "att" else ("k", "r"):
            mu = w[f"{b}{part}.time_mix_{key}"].reshape(C)
            mixed[key] = x * mu + prev * (1 - mu)
        return mixed

    def lif(current):  # [L, C] -> spikes [L, C], membrane carried over the tokens
        v, out = torch.zeros(C, dtype=current.dtype), []
        for x_t in current:
            h = v + (x_t - v) / 2.0
            s = (h - 1.0 >= 0).double()
            v = h * (1 - s)
            out.append(s)
        return torch.stack(out)

    def wkv(k, v, b):
        decay, bonus = torch.exp(w[b + "att.time_decay"]), w[b + "att.time_first"]
        out = []
        for t in range(len(k)):
            i = torch.arange(t + 1, dtype=torch.float64)[:, None]
            logits = -(t - 1 - i) * decay + k[: t + 1]
            logits[t] = bonus + k[t]
            out.append((torch.softmax(logits, 0) * v[: t + 1]).sum(0))
        return torch.stack(out)

    x = w["emb.weight"][idx]
    if binary_embedding:
        x = (x >= 0).double()
    x = ln(x, "blocks.0.ln0")
    for i in range(N):
        b = f"blocks.{i}."
        m = shift(ln(x, b + "ln1"), b, "att")
        k, v = m["k"] @ w[b + "att.key.weight"].T, m["v"] @ w[b + "att.value.weight"].T
        r = m["r"] @ w[b + "att.receptance.weight"].T
        x = x + lif((torch.sigmoid(r) * wkv(k, v, b)) @ w[b + "att.output.weight"].T)
        m = shift(ln(x, b + "ln2"), b, "ffn")
        kv = torch.relu(m["k"] @ w[b + "ffn.key.weight"].T).square() @ w[b + "ffn.value.weight"].T
        x = x + lif(torch.sigmoid(m["r"] @ w[b + "ffn.receptance.weight"].T) * kv)
    return ln(x, "ln_out") @ w["head.weight"].T


@pytest.mark.parametrize("binary_embedding", [True, False])
def test_converted_logits_equal_spikegpt_equations(binary_embedding):
    from students import SpikeGPTForCausalLM
    from students.import_spikegpt import convert_state_dict

    sd = spikegpt_state_dict()
    config, state = convert_state_dict(sd, binary_embedding=binary_embedding)
    model = SpikeGPTForCausalLM(config).eval()
    model.load_state_dict(state)
    idx = torch.randint(0, V, (12,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ours = model(idx[None]).logits[0].double()
    expected = spikegpt_forward(sd, idx, binary_embedding)
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)
    rates = model.spike_rates()  # the comparison is meaningful only if the LIFs fire, but not always
    assert all(0.05 < r < 0.95 for name, r in rates.items() if name.endswith("_neuron")), rates


def test_reference_forward_is_sensitive():
    # The hand-written forward must notice a swapped token-shift pair, so the equality above checks something.
    sd = spikegpt_state_dict()
    idx = torch.arange(10) % V
    swapped = dict(sd, **{"blocks.1.att.time_mix_k": sd["blocks.1.att.time_mix_v"],
                          "blocks.1.att.time_mix_v": sd["blocks.1.att.time_mix_k"]})
    assert (spikegpt_forward(sd, idx) - spikegpt_forward(swapped, idx)).abs().max() > 1e-2


def test_cli_writes_a_loadable_self_contained_folder(tmp_path, tiny_teacher_dir, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = tmp_path / "spikegpt.pth"
    sd = spikegpt_state_dict(seed=2)
    torch.save(sd, ckpt)
    out = tmp_path / "imported"
    assert main(["import-spikegpt", str(ckpt), "--out", str(out), "--tokenizer", str(tiny_teacher_dir)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert (out / "model.safetensors").is_file() and (out / "modeling_spikegpt.py").is_file()
    assert "ridgerchu/SpikeGPT" in (out / "README.md").read_text()
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert AutoTokenizer.from_pretrained(out) is not None
    idx = torch.arange(9) % V
    with torch.no_grad():
        torch.testing.assert_close(model(idx[None]).logits[0].double(), spikegpt_forward(sd, idx),
                                   rtol=1e-4, atol=1e-4)


class NotWeights:
    """A pickled object: weights_only loading must refuse it rather than run its code."""


def _fails(capsys, argv) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "Traceback" not in err, err
    return err


def test_bad_checkpoints_are_one_line_naming_the_key(tmp_path, capsys):
    out = str(tmp_path / "out")
    sd = spikegpt_state_dict()
    cases = {
        "unknown": ({**sd, "blocks.0.ffnPre.key.weight": torch.zeros(4 * C, C)}, r"unknown key 'blocks\.0\.ffnPre"),
        "shape": ({**sd, "blocks.2.att.key.weight": torch.zeros(C, C + 1)},
                  r"blocks\.2\.att\.key\.weight has shape \[16, 17\], expected \[16, 16\]"),
        "missing": ({k: v for k, v in sd.items() if k != "ln_out.bias"}, r"missing key ln_out\.bias"),
        "head_qk": ({**sd, "head_q.weight": torch.zeros(8, C)}, r"unknown key 'head_q\.weight'"),
    }
    for name, (bad, pattern) in cases.items():
        path = tmp_path / f"{name}.pth"
        torch.save(bad, path)
        err = _fails(capsys, ["import-spikegpt", str(path), "--out", out])
        assert re.search(pattern, err) and str(path) in err, err
    assert not (tmp_path / "out").exists()

    pickled = tmp_path / "pickled.pth"
    torch.save({"emb.weight": torch.zeros(2, 2), "extra": NotWeights()}, pickled)
    assert "not a loadable weights-only checkpoint" in _fails(capsys, ["import-spikegpt", str(pickled), "--out", out])
    assert "no such checkpoint" in _fails(capsys, ["import-spikegpt", str(tmp_path / "nope.pth"), "--out", out])
