"""The align and distill stages end to end on a tiny random Llama teacher and a tiny spiking student."""

import json
import logging
import shutil
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


@pytest.mark.parametrize("kind, tau", [("forward_kl", 2.0), ("reverse_kl", 1.0)])
def test_distill_from_the_hidden_store_is_distill_from_the_online_teacher(tmp_path, tiny_teacher_dir, prepared,
                                                                         kind, tau):
    """teacher_cache.store=hidden (fp32) recomputes the teacher's full logits: the same KD and CE at every step
    as the online teacher, at a temperature and a kind a top-k cache cannot give."""
    from pipeline.stages import distill
    from teachers import load_teacher
    from teachers.cache import build_teacher_cache

    runs = {}
    for store in ("online", "hidden"):
        r = _recipe(tiny_teacher_dir, steps=3)
        r.align.enabled = False
        r.distill.kd.kind, r.distill.kd.temperature = kind, tau
        up = {"prepare": {"outputs": {"dataset": str(prepared)}}}
        if store == "hidden":
            r.teacher_cache.enabled, r.teacher_cache.store, r.teacher_cache.value_dtype = True, "hidden", "fp32"
            build_teacher_cache(load_teacher(str(tiny_teacher_dir)), prepared, tmp_path / "cache", batch_size=4,
                                value_dtype="fp32", progress=False, store="hidden")
            up["teacher_cache"] = {"outputs": {"cache": str(tmp_path / "cache")}}
        distill.run(_ctx(r, tmp_path / store, "distill", up))
        runs[store] = [x for x in _rows(tmp_path / store / "distill" / "metrics.jsonl") if x["split"] == "train"]
    assert len(runs["hidden"]) == 3 and runs["hidden"][0]["kd"] > 0
    for a, b in zip(runs["hidden"], runs["online"], strict=True):
        assert a["kd"] == pytest.approx(b["kd"], rel=1e-4) and a["ce"] == pytest.approx(b["ce"], rel=1e-4)


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


def _record_reads(monkeypatch) -> dict[int, list[int]]:
    """Dataset indices read by each training (shuffled) DataStream, in creation order of the streams."""
    from pipeline.trainer import DataStream

    reads: dict[int, list[int]] = {}
    rows = DataStream.rows

    def recording(self, start, count):
        if self.shuffle:
            reads.setdefault(id(self), []).extend(self.index(p) for p in range(start, start + count))
        return rows(self, start, count)

    monkeypatch.setattr(DataStream, "rows", recording)
    return reads


def test_distill_reads_the_rows_of_a_run_without_align_and_align_reads_others(tmp_path, tiny_teacher_dir, prepared,
                                                                                monkeypatch):
    from pipeline.stages import align, distill
    from teachers.data import TokenDataset

    reads = _record_reads(monkeypatch)
    r = _recipe(tiny_teacher_dir)
    up = {"prepare": {"outputs": {"dataset": str(prepared)}}}
    aligned = align.run(_ctx(r, tmp_path / "with", "align", up))
    distill.run(_ctx(r, tmp_path / "with", "distill", {**up, "align": {"outputs": aligned.outputs}}))
    r.align.enabled = False
    distill.run(_ctx(r, tmp_path / "without", "distill", up))
    align_rows, after_align, alone = reads.values()
    assert len(after_align) == len(align_rows) == 3 * 2 and 3 * 2 * 2 <= len(TokenDataset(prepared, "train"))
    assert after_align == alone  # the same rows in the same order, whatever align did
    assert not set(align_rows) & set(after_align)  # align read rows of its own, none of distill's


JOINT_RECIPE = """\
run: {{name: joint, seed: 0}}
data: {{sources: [{corpus}], seq_len: 16, val_fraction: 0.1}}
teacher: {{spec: {teacher}, dtype: fp32}}
student: {{preset: tiny, config: {{n_layer: 2, d_model: 16, n_head: 2}}}}
teacher_cache: {{enabled: {cached}, k: 8, value_dtype: fp32, batch_size: 4}}
align: {{enabled: false}}
distill:
  train: {{steps: 4, batch_size: 2, eval_every: 2, eval_batches: 1, checkpoint_every: 2, log_every: 1}}
  weights: {{ea: 0.2, saa: 0.1, sfa: 0.1, sta: 0.3, hta: 0.3}}
  kd: {{chunk_size: 7}}
"""


@pytest.mark.parametrize("cached", [True, False])
def test_joint_spad_trains_checkpoints_resumes_and_exports_the_student_alone(tmp_path, tiny_teacher_dir, cached,
                                                                             monkeypatch, caplog):
    """g_snn_spad_joint's shape at tiny size: the five terms together through distill (STA from the cache or the
    online teacher), projections saved and resumed, no parameter frozen, the exported student without them."""
    from pipeline import build
    from pipeline.recipe import load_recipe
    from pipeline.runner import run_pipeline
    from students import SpikeGPTForCausalLM

    frozen = []
    freeze = build.freeze_unreached_parameters
    monkeypatch.setattr(build, "freeze_unreached_parameters", lambda *a: frozen.extend(freeze(*a)) or frozen)
    (tmp_path / "corpus.txt").write_text(TEXT)
    (tmp_path / "joint.yaml").write_text(JOINT_RECIPE.format(corpus=tmp_path / "corpus.txt", teacher=tiny_teacher_dir,
                                                             cached=str(cached).lower()))
    recipe, run = load_recipe(tmp_path / "joint.yaml"), tmp_path / "run"
    run_pipeline(recipe, run_dir=run, stages=["prepare", "teacher_cache", "distill", "export"] if cached
                 else ["prepare", "distill", "export"])
    assert frozen == []
    rows = _rows(run / "distill" / "metrics.jsonl")
    train = [x for x in rows if x["split"] == "train"]
    assert len(train) == 4 and all({"ea", "saa", "sfa", "kd", "ce"} <= set(x) for x in train)
    for x in train:
        want = 0.2 * x["ea"] + 0.1 * x["saa"] + 0.1 * x["sfa"] + 0.3 * x["kd"] + 0.3 * x["ce"]
        assert x["loss"] == pytest.approx(want, rel=1e-5) and min(x[k] for k in ("ea", "saa", "sfa", "kd")) > 0
    proj = load_file(run / "distill" / "projections.safetensors")
    assert {k.split(".")[0] + "." + k.split(".")[1] for k in proj if k.startswith("sfa_proj")} == {"sfa_proj.0",
                                                                                                  "sfa_proj.1"}
    assert "ea_proj.weight" in proj
    student = load_file(run / "distill" / "student" / "model.safetensors")

    # resume: lose the last checkpoint and the stage's record; the rerun continues from step 2 to the same weights
    shutil.rmtree(run / "distill" / "checkpoints" / "step-0000004")
    (run / "distill" / "done.json").unlink()
    with caplog.at_level(logging.INFO, logger="pipeline.trainer"):
        run_pipeline(recipe, run_dir=run, stages=["distill"])
    assert any("resumed from" in m and "(step 2)" in m for m in caplog.messages)
    for before, after in ((proj, load_file(run / "distill" / "projections.safetensors")),
                          (student, load_file(run / "distill" / "student" / "model.safetensors"))):
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    exported = load_file(run / "export" / "model" / "model.safetensors")
    assert not any("proj" in k or k.startswith("spad") for k in exported)
    model = SpikeGPTForCausalLM.from_pretrained(run / "export" / "model")
    assert all(torch.equal(v, student[k]) for k, v in model.state_dict().items() if k in student)


HIDDEN_RECIPE = """\
run: {{name: hidden, seed: 0}}
data: {{sources: [{corpus}], seq_len: 16, val_fraction: 0.1}}
teacher: {{spec: {teacher}, dtype: fp32}}
student: {{preset: tiny, config: {{n_layer: 2, d_model: 16, n_head: 2}}}}
teacher_cache: {{enabled: true, store: hidden, value_dtype: bf16, batch_size: 4}}
align: {{enabled: false}}
distill:
  train: {{steps: 2, batch_size: 2, eval_every: 2, eval_batches: 1, checkpoint_every: 2, log_every: 1}}
  kd: {{kind: jsd, temperature: 4.0, chunk_size: 7}}
"""


def test_a_recipe_with_the_hidden_store_runs_through_the_pipeline(tmp_path, tiny_teacher_dir):
    """teacher_cache.store reaches the stage: the cache holds hidden states and the head, and distill trains
    JSD at tau 4 from it (a kind and temperature a top-k cache refuses or cannot give)."""
    from pipeline.recipe import load_recipe
    from pipeline.runner import run_pipeline

    (tmp_path / "corpus.txt").write_text(TEXT)
    (tmp_path / "r.yaml").write_text(HIDDEN_RECIPE.format(corpus=tmp_path / "corpus.txt", teacher=tiny_teacher_dir))
    run = tmp_path / "run"
    run_pipeline(load_recipe(tmp_path / "r.yaml"), run_dir=run, stages=["prepare", "teacher_cache", "distill"])
    cache = run / "teacher_cache" / "cache"
    key = json.loads((cache / "manifest.json").read_text())["key"]
    assert key["format"] == "hidden/1" and (cache / "head.safetensors").is_file()
    train = [x for x in _rows(run / "distill" / "metrics.jsonl") if x["split"] == "train"]
    assert len(train) == 2 and all(x["kd"] > 0 for x in train)
