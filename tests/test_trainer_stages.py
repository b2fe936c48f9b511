"""The align and distill stages end to end on a tiny random Llama teacher and a tiny spiking student."""

import json
import logging
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file

from pipeline.schema import Recipe, TrainConfig
from pipeline.stages import StageContext

TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
        "want of a wife. To be, or not to be, that is the question. ") * 40


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_teacher_dir, tiny_tokenizer):
    from teachers.data import prepare_corpus

    root = tmp_path_factory.mktemp("prepared")
    src = root / "corpus.txt"
    src.write_text(TEXT)
    prepare_corpus([str(src)], tiny_tokenizer, root / "dataset", seq_len=16, val_fraction=0.1, seed=0)
    return root / "dataset"


def _recipe(teacher_dir: Path, **train) -> Recipe:
    r = Recipe()
    r.teacher.spec, r.teacher.dtype = str(teacher_dir), "fp32"
    r.student.preset = "tiny"
    r.student.config = {"n_layer": 2, "d_model": 16, "n_head": 2}
    settings = {"steps": 3, "batch_size": 2, "eval_every": 3, "eval_batches": 1, "checkpoint_every": 2,
                "log_every": 1, **train}
    r.align.train = TrainConfig(**settings)
    r.distill.train = TrainConfig(**settings)
    r.distill.kd.chunk_size = 7
    return r


def _ctx(recipe, run_dir: Path, name: str, upstream: dict) -> StageContext:
    stage_dir = run_dir / name
    stage_dir.mkdir(parents=True, exist_ok=True)
    return StageContext(recipe=recipe, run_dir=run_dir, stage_dir=stage_dir, upstream=upstream,
                        accelerator=Accelerator(cpu=True), is_main=True, log=logging.getLogger("test"))


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_align_then_distill_online(tmp_path, tiny_teacher_dir, prepared):
    from pipeline.stages import align, distill
    from students import SpikeGPTForCausalLM

    r = _recipe(tiny_teacher_dir)
    up = {"prepare": {"outputs": {"dataset": str(prepared)}}}
    res = align.run(_ctx(r, tmp_path, "align", up))
    assert set(res.outputs) == {"student", "projections"}
    proj = load_file(res.outputs["projections"])
    assert any(k.startswith("ea_proj") for k in proj) and any(k.startswith("sfa_proj.1") for k in proj)
    assert res.metrics["layer_map"] == [0, 1]
    rows = _rows(tmp_path / "align" / "metrics.jsonl")
    train = [x for x in rows if x["split"] == "train"]
    assert {"ea", "saa", "sfa", "loss"} <= set(train[0]) and all(x["loss"] > 0 for x in train)
    student = SpikeGPTForCausalLM.from_pretrained(res.outputs["student"])
    assert student.config.vocab_size == 320

    up["align"] = {"outputs": res.outputs}
    res2 = distill.run(_ctx(r, tmp_path, "distill", up))
    rows = _rows(tmp_path / "distill" / "metrics.jsonl")
    train = [x for x in rows if x["split"] == "train"]
    assert {"kd", "ce"} <= set(train[0]) and "ea" not in train[0]
    # loss = 0.3 kd + 0.3 ce per token (published STA/HTA weights)
    assert train[-1]["loss"] == pytest.approx(0.3 * train[-1]["kd"] + 0.3 * train[-1]["ce"], rel=1e-5)
    assert "val_bits_per_byte" in res2.metrics
    after = SpikeGPTForCausalLM.from_pretrained(res2.outputs["student"])
    changed = any(not torch.equal(a, b) for a, b in zip(student.state_dict().values(), after.state_dict().values()))
    assert changed


def test_distill_from_the_teacher_cache_without_align(tmp_path, tiny_teacher_dir, prepared):
    from pipeline.stages import distill
    from teachers import load_teacher
    from teachers.cache import build_teacher_cache

    r = _recipe(tiny_teacher_dir, steps=2)
    r.align.enabled = False
    r.teacher_cache.enabled, r.teacher_cache.k, r.teacher_cache.value_dtype = True, 8, "fp32"
    cache = tmp_path / "cache"
    build_teacher_cache(load_teacher(str(tiny_teacher_dir)), prepared, cache, k=8, batch_size=4,
                        value_dtype="fp32", progress=False, temperature=r.distill.kd.temperature)
    up = {"prepare": {"outputs": {"dataset": str(prepared)}}, "teacher_cache": {"outputs": {"cache": str(cache)}}}
    res = distill.run(_ctx(r, tmp_path, "distill", up))
    train = [x for x in _rows(tmp_path / "distill" / "metrics.jsonl") if x["split"] == "train"]
    assert len(train) == 2 and train[0]["kd"] > 0
    assert Path(res.outputs["student"], "model.safetensors").is_file()


@pytest.mark.parametrize("normed", [True, False])
def test_align_sfa_target_norm_reaches_the_loss(tiny_teacher_dir, normed):
    from pipeline.build import build_spad, build_student
    from teachers import load_teacher

    recipe = _recipe(tiny_teacher_dir)
    recipe.align.sfa_target_norm = normed
    teacher = load_teacher(str(tiny_teacher_dir))
    student = build_student(recipe, teacher.vocab_size)
    spad = build_spad(recipe, student, teacher, {"ea": 0.0, "saa": 0.0, "sfa": 1.0}, logging.getLogger("t"))
    assert spad.sfa_target_norm is normed
