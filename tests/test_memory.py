"""pipeline.memory: the activation probe extrapolates exactly, parameters are counted without memory, the
available memory is read from the override, /proc/meminfo and the cgroup, and the estimate grows as it should."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline import memory
from pipeline.errors import ConfigError
from pipeline.recipe import load_recipe, student_config
from teachers import describe_teacher

# a hybrid student (every mixer), T = 2, every SpAD term: the probe must add up each kind of layer
HYBRID = ["student.preset=tiny", "student.config.n_layer=4", "student.config.d_model=16", "student.config.n_head=2",
          "student.config.token_mixer=[srwkv,sfsa,sfsa_linear,srwkv]", "student.config.time_steps=2",
          "align.weights.ea=0.2", "align.weights.saa=0.1", "align.weights.sfa=0.1", "data.seq_len=40"]


@pytest.fixture(scope="module")
def setting(tiny_teacher_dir):
    recipe = load_recipe(None, [f"teacher.spec={tiny_teacher_dir}", "teacher.dtype=fp32", *HYBRID])
    shape = describe_teacher(tiny_teacher_dir)
    weights = {k: float(v) for k, v in vars(recipe.align.weights).items()}
    return recipe, shape, student_config(recipe, shape.vocab), weights


def test_probe_on_small_models_equals_the_whole_student_at_the_full_length(setting):
    recipe, shape, config, weights = setting
    # independent figure: one forward of the whole 4-layer student (real vocabulary) at the full 40 tokens
    torch.manual_seed(0)
    student, spad = memory._build(recipe, config, shape, weights)
    direct = memory._saved_bytes(student, spad, recipe.data.seq_len, shape)
    assert direct > 0
    assert memory.activation_bytes(recipe, config, shape, weights) == pytest.approx(direct, rel=1e-9)


def test_parameters_are_counted_on_the_meta_device(setting):
    recipe, shape, config, weights = setting
    student, spad = memory._build(recipe, config, shape, weights)
    built = sum(p.numel() for m in (student, spad) for p in m.parameters())
    assert memory.parameter_count(recipe, config, shape, weights) == built


def test_the_estimate_is_linear_in_the_batch_and_names_its_key(setting):
    recipe, shape, _, _ = setting
    est = memory.estimate_stage(recipe, "align", shape)
    assert est.batch_key == "align.train.batch_size" and est.batch == recipe.align.train.batch_size
    step = est.total(3) - est.total(2)
    assert step == pytest.approx(sum(est.per_row.values())) and step > 0
    assert est.total(5) == pytest.approx(est.total(2) + 3 * step)
    # the teacher's weights in its dtype: parameters x 4 bytes for fp32
    assert est.fixed["teacher weights"] == shape.parameters * 4


def test_weight_inheritance_adds_its_set_up_peak(tiny_teacher_dir, setting):
    recipe, shape, _, _ = setting
    plain = memory.estimate_stage(recipe, "align", shape)
    inherit = load_recipe(None, [f"teacher.spec={tiny_teacher_dir}", "teacher.dtype=fp32", *HYBRID,
                                 "student.init_from_teacher=true"])
    est = memory.estimate_stage(inherit, "align", shape)
    assert plain.setup == 0 and est.setup > 0
    assert est.setup - memory.INHERIT_COPIES * 8.0 * shape.vocab * shape.embed_width == pytest.approx(
        memory.BASELINE_BYTES + shape.parameters * 4 + 4.0 * memory.parameter_count(
            inherit, student_config(inherit, shape.vocab), shape, {k: float(v) for k, v in
                                                                    vars(inherit.align.weights).items()}))


@pytest.mark.parametrize("text, expected", [("12G", 12 * 10**9), ("512MB", 512 * 10**6), ("1.5g", int(1.5e9)),
                                            ("4096", 4096), ("2TiB", 2 * 2**40), ("3 GiB", 3 * 2**30)])
def test_available_memory_override(monkeypatch, text, expected):
    monkeypatch.setenv(memory.ENV_AVAILABLE, text)
    assert memory.available_memory() == (expected, memory.ENV_AVAILABLE)


def test_a_bad_override_is_one_line():
    with pytest.raises(ConfigError, match="SPIKEDISTILL_MEMORY_AVAILABLE='lots': expected bytes"):
        memory.parse_bytes("lots")


def test_meminfo_and_the_cgroup_limit_take_the_smaller(tmp_path, monkeypatch):
    monkeypatch.delenv(memory.ENV_AVAILABLE, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(memory, "_mem_available", lambda: 20 * 2**30)
    monkeypatch.setattr(memory, "_cgroup_room", lambda: 3 * 2**30)
    assert memory.available_memory() == (3 * 2**30, "cgroup limit - usage")
    monkeypatch.setattr(memory, "_cgroup_room", lambda: None)
    assert memory.available_memory() == (20 * 2**30, "MemAvailable")


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_cgroup_room_is_limit_minus_usage(tmp_path, monkeypatch, version):
    root = tmp_path / "cgroup"
    if version == "v2":
        (root / "job").mkdir(parents=True)
        (root / "job" / "memory.max").write_text("8589934592\n")
        (root / "job" / "memory.current").write_text("1073741824\n")
        groups = "0::/job\n"
    else:
        (root / "memory" / "job").mkdir(parents=True)
        (root / "memory" / "job" / "memory.limit_in_bytes").write_text("8589934592\n")
        (root / "memory" / "job" / "memory.usage_in_bytes").write_text("1073741824\n")
        groups = "4:memory:/job\n1:cpu:/\n"
    real = Path

    def fake(path="", *rest):  # /sys/fs/cgroup and /proc/self/cgroup point into tmp_path
        text = str(path)
        if text == "/sys/fs/cgroup":
            return root
        if text == "/proc/self/cgroup":
            (tmp_path / "self_cgroup").write_text(groups)
            return tmp_path / "self_cgroup"
        return real(path, *rest)

    monkeypatch.setattr(memory, "Path", fake)
    assert memory._cgroup_room() == 8 * 2**30 - 2**30


@pytest.mark.parametrize("vocab, size", [("teacher", None), ("subset:300", 300), ("bytes", 256)])
def test_the_student_head_is_counted_at_the_student_vocabulary(tiny_teacher_dir, setting, vocab, size):
    """A derived student.vocab sizes the student's embedding, head and logits chunk, not the teacher's
    vocabulary (the bytes arm's head is ~200x smaller than the teacher's)."""
    _, shape, _, _ = setting
    recipe = load_recipe(None, [f"teacher.spec={tiny_teacher_dir}", "teacher.dtype=fp32", *HYBRID,
                                f"student.vocab={vocab}", "align.enabled=false", "distill.weights.sta=1.0"])
    expected = shape.vocab if size is None else size + memory.SPECIALS_ROOM
    assert memory.student_vocab_size(recipe, shape) == expected
    est = memory.estimate_stage(recipe, "distill", shape)
    # independent figure: three fp32 [chunk_size, V] buffers (HEAD_BUFFERS), counted by hand
    assert est.fixed["logits"] == 3 * 4 * recipe.distill.kd.chunk_size * expected


def test_the_hidden_store_adds_the_teacher_head_not_the_teacher(tiny_teacher_dir, setting):
    """Distill from a hidden store holds the teacher's head (fp32 [V, C_t]), one chunk of its logits and the
    rows' hidden states, never the teacher's body; the top-k cache holds none of them."""
    _, shape, _, _ = setting
    base = [f"teacher.spec={tiny_teacher_dir}", "teacher.dtype=fp32", *HYBRID, "align.enabled=false",
            "teacher_cache.enabled=true"]
    topk = memory.estimate_stage(load_recipe(None, base), "distill", shape)
    recipe = load_recipe(None, [*base, "teacher_cache.store=hidden"])
    hidden = memory.estimate_stage(recipe, "distill", shape)
    assert "teacher weights" not in hidden.fixed and "teacher head" not in topk.fixed
    chunk, length = recipe.distill.kd.chunk_size, recipe.data.seq_len
    assert hidden.fixed["teacher head"] == 4 * shape.vocab * shape.hidden  # by hand: fp32 V x C_t
    assert hidden.fixed["teacher logits"] == 2 * 4 * chunk * shape.vocab
    assert hidden.per_row["teacher hidden"] == 4 * length * shape.hidden
    assert hidden.total(2) - topk.total(2) == pytest.approx(
        4 * shape.vocab * shape.hidden + 8 * chunk * shape.vocab + 2 * 4 * length * shape.hidden)
