"""SpikeGPTConfig: presets, validation of bad values, Auto-class registration."""
import pytest
from transformers import AutoConfig

import students
from students import SpikeGPTConfig, StudentError


def test_presets_and_overrides():
    cfg = SpikeGPTConfig.from_preset("216m", vocab_size=49152, time_steps=2)
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.vocab_size, cfg.time_steps) == (18, 768, 12, 49152, 2)
    assert SpikeGPTConfig.from_preset("46m").d_model == 512
    assert SpikeGPTConfig.from_preset("demo", vocab_size=320).layer_mixers == ["srwkv"] * 4
    assert cfg.ffn_hidden == 4 * 768 and cfg.head_dim == 64


def test_unknown_preset_names_the_choices():
    with pytest.raises(StudentError, match="preset must be one of"):
        SpikeGPTConfig.from_preset("huge")


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"token_mixer": "attention"}, "token_mixer"),
        ({"token_mixer": ["srwkv", "sfsa", "sfsa"]}, "token_mixer"),
        ({"token_mixer": ["srwkv", "mamba"]}, "token_mixer"),
        ({"d_model": 30, "n_head": 4}, "d_model"),
        ({"time_steps": 0}, "time_steps"),
        ({"lif_reset": "zero"}, "lif_reset"),
        ({"surrogate": "relu"}, "surrogate"),
        ({"lif_threshold": 0.0}, "lif_threshold"),
        ({"sfsa_threshold": -1.0}, "sfsa_threshold"),
        ({"sfsa_threshold": [1.0, 2.0, 3.0]}, "sfsa_threshold"),
        ({"n_layer": 0}, "n_layer"),
    ],
)
def test_bad_values_raise_value_error_naming_the_field(overrides, field):
    with pytest.raises(ValueError, match=rf"SpikeGPTConfig\.{field}=") as info:
        SpikeGPTConfig.from_preset("tiny", **overrides)
    assert "\n" not in str(info.value)
    assert isinstance(info.value, StudentError)


def test_unknown_mixer_lists_the_allowed_ones():
    with pytest.raises(ValueError, match="srwkv.*sfsa.*sfsa_linear"):
        SpikeGPTConfig.from_preset("tiny", token_mixer="gla")


def test_per_layer_mixers_and_head_thresholds():
    cfg = SpikeGPTConfig.from_preset("tiny", token_mixer=["sfsa", "srwkv"], sfsa_threshold=[2.0, 3.0])
    assert cfg.layer_mixers == ["sfsa", "srwkv"]
    assert cfg.head_thresholds == [2.0, 3.0]


def test_registered_with_auto_config(tmp_path):
    assert students.SpikeGPTConfig is AutoConfig.for_model("spikegpt").__class__
    SpikeGPTConfig.from_preset("tiny", token_mixer=["sfsa", "srwkv"]).save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, SpikeGPTConfig) and loaded.layer_mixers == ["sfsa", "srwkv"]
