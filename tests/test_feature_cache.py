"""The feature cache (teacher_cache.features): the joint SpAD objective from stored teacher targets equals the
one from the online teacher; its key, resume, shared directory and a run through distill, resume and export."""

import json
import logging
import math

import pytest
import torch

from pipeline.build import build_spad, build_student
from pipeline.losses import DistillObjective, SpADTargets
from pipeline.schema import Recipe
from pipeline.stages.teacher_cache import build_features
from teachers import CacheError, load_teacher
from teachers import cache as cache_mod
from teachers.cache import topk_targets
from teachers.data import TokenDataset, prepare_corpus
from teachers.feature_cache import FeatureCache, nominal_bytes_per_row

JOINT = {"ea": 0.2, "saa": 0.1, "sfa": 0.1, "sta": 0.3, "hta": 0.3}
SEQ = 16
TEXT = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in "
        "want of a wife. To be, or not to be, that is the question. ") * 40
LOG = logging.getLogger("test")


@pytest.fixture(scope="module")
def teacher(tiny_teacher_dir):
    return load_teacher(str(tiny_teacher_dir), attn_maps=True)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("prepared")
    (root / "corpus.txt").write_text(TEXT)
    prepare_corpus([str(root / "corpus.txt")], tiny_tokenizer, root / "dataset", seq_len=SEQ, val_fraction=0.1, seed=0)
    return root / "dataset"


def _recipe(teacher_dir, mixer: str = "srwkv", value_dtype: str = "fp32", n_head: int = 2,
            head_mapping: str = "mean") -> Recipe:
    r = Recipe()
    r.align.head_mapping = head_mapping
    r.teacher.spec, r.teacher.dtype = str(teacher_dir), "fp32"
    r.student.preset = "tiny"
    r.student.config = {"n_layer": 2, "d_model": 16, "n_head": n_head, "token_mixer": mixer}
    r.teacher_cache.enabled, r.teacher_cache.features, r.teacher_cache.value_dtype = True, True, value_dtype
    r.teacher_cache.batch_size = 3
    r.align.enabled = False
    r.distill.weights.ea, r.distill.weights.saa, r.distill.weights.sfa = 0.2, 0.1, 0.1
    return r


def _terms_and_grads(objective, ids, **batch) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    objective.zero_grad(set_to_none=True)
    out = objective(ids, **batch)
    out["loss"].backward()
    grads = {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}
    return {k: float(v.detach()) for k, v in out.items()}, grads


def _online_and_cached(teacher, prepared, recipe, out, rows=(0, 3, 5)):
    """(terms, gradients) of the joint objective on dataset rows `rows`, from the online teacher and from the
    feature cache built in `out`; STA reads the same top-8 targets in both, so only the SpAD targets differ."""
    build_features(recipe, teacher, str(prepared), out, progress=False)
    student = build_student(recipe, teacher.vocab_size)
    spad = build_spad(recipe, student, teacher, JOINT, LOG)
    kd = {"temperature": 2.0, "chunk_size": 7}
    ds = TokenDataset(prepared)
    ids = torch.stack([ds[i] for i in rows])
    targets = topk_targets(teacher(ids).logits, 8, 2.0)
    online = DistillObjective(student, JOINT, teacher=teacher, spad=spad, kd=kd)
    cached = DistillObjective(student, JOINT, teacher=None, spad=spad, kd=kd)
    features = SpADTargets.from_tensors(FeatureCache(out).batch(list(rows)))
    return _terms_and_grads(online, ids, targets=targets), _terms_and_grads(cached, ids, targets=targets,
                                                                             features=features)


@pytest.mark.parametrize("mixer,head_mapping", [("srwkv", "mean"), ("sfsa", "mean"), ("srwkv", "learned")])
def test_fp32_cache_gives_the_online_joint_loss_and_gradients(tiny_teacher_dir, teacher, prepared, tmp_path, mixer,
                                                              head_mapping):
    """Mean head mapping stores the maps mapped onto the student's heads, learned the teacher's raw maps."""
    recipe = _recipe(tiny_teacher_dir, mixer, head_mapping=head_mapping)
    (on_terms, on_grads), (c_terms, c_grads) = _online_and_cached(teacher, prepared, recipe, tmp_path / "features")
    assert set(c_terms) == set(on_terms) == {"loss", "ea", "saa", "sfa", "kd", "ce"}
    assert min(on_terms[k] for k in ("ea", "saa", "sfa")) > 0
    for term, value in on_terms.items():
        assert c_terms[term] == pytest.approx(value, rel=1e-5, abs=1e-7), term
    assert c_grads.keys() == on_grads.keys() and any(n.startswith("spad.sfa_proj") for n in on_grads)
    for name, grad in on_grads.items():
        torch.testing.assert_close(c_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_bf16_cache_is_within_tolerance(tiny_teacher_dir, teacher, prepared, tmp_path):
    """bf16 keeps 8 mantissa bits (each stored value within 2^-9 of its own size): the terms that compare values
    move by < 1e-3. SAA's rate code fires a key at or above its uniform share of the row, and the tiny random
    teacher's maps are near uniform, so rounding flips some keys across it: SAA within 5% (measured 2.6%
    srwkv, 4.2% sfsa). The whole objective's gradient keeps a cosine >= 0.9999 with the online one."""
    (on_terms, on_grads), (c_terms, c_grads) = _online_and_cached(teacher, prepared,
                                                                  _recipe(tiny_teacher_dir, value_dtype="bf16"),
                                                                  tmp_path / "features")
    for term, value in on_terms.items():
        assert c_terms[term] == pytest.approx(value, rel=0.05 if term == "saa" else 1e-3), term
    assert c_terms["saa"] != on_terms["saa"]  # bf16 really reached the loss
    flat = [torch.cat([g[n].flatten() for n in sorted(on_grads)]) for g in (on_grads, c_grads)]
    assert float(torch.nn.functional.cosine_similarity(*flat, dim=0)) >= 0.9999


def test_shards_hold_the_targets_of_the_weighted_terms_in_their_stored_form(tiny_teacher_dir, teacher, prepared,
                                                                            tmp_path):
    """Per row: EA [L, C], SFA [n, L, C], SAA maps mapped onto the student's 2 heads as the causal lower
    triangle, L (L + 1) / 2 values per head; the bytes per row are those shapes' (fp32) plus the headers."""
    recipe = _recipe(tiny_teacher_dir)
    recipe.distill.weights.ea = 0.0
    stats = build_features(recipe, teacher, str(prepared), tmp_path / "f", progress=False)
    cache = FeatureCache(tmp_path / "f")
    stored = cache.row(0)
    n, width = 2, teacher.hidden_size
    assert {k: tuple(v.shape) for k, v in stored.items()} == {"features": (n, SEQ, width),
                                                              "maps": (n, 2, SEQ * (SEQ + 1) // 2)}
    assert cache.key["terms"] == ["saa", "sfa"] and cache.key["heads"] == 2 and cache.key["layer_map"] == [0, 1]
    row_bytes = nominal_bytes_per_row(cache.key)
    assert row_bytes == 4 * (n * SEQ * width + n * 2 * SEQ * (SEQ + 1) // 2)
    assert row_bytes < stats["bytes_per_row"] < row_bytes + 2048 / cache.manifest["shard_rows"]
    maps = cache[0]["maps"]  # the zeros above the diagonal are put back; each causal row sums to 1
    assert maps.shape == (n, 2, SEQ, SEQ) and float(maps.triu(1).abs().sum()) == 0.0
    torch.testing.assert_close(maps.sum(-1), torch.ones(n, 2, SEQ))


def test_a_cache_for_other_inputs_is_refused_in_one_line(tiny_teacher_dir, teacher, prepared, tmp_path):
    out = tmp_path / "features"
    build_features(_recipe(tiny_teacher_dir), teacher, str(prepared), out, progress=False)
    key = FeatureCache(out).key
    other_map = _recipe(tiny_teacher_dir)
    other_map.teacher.layer_map = {0: 1}
    other_norm = _recipe(tiny_teacher_dir)
    other_norm.align.sfa_target_norm = False
    cases = {"layer_map=[0, 1] (expected [1, 1])": other_map,
             "heads=2 (expected 4)": _recipe(tiny_teacher_dir, n_head=4),
             "sfa_target_norm=True (expected False)": other_norm}
    for said, recipe in cases.items():
        with pytest.raises(CacheError, match="holds a cache for other inputs") as exc:
            build_features(recipe, teacher, str(prepared), out, progress=False)
        assert said in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(CacheError, match=r"built for other inputs \(heads=2 \(expected 4\)\)") as exc:
        FeatureCache(out, expect={**key, "heads": 4})
    assert "\n" not in str(exc.value)


def test_distill_refuses_features_built_for_another_recipe(tiny_teacher_dir, teacher, prepared, tmp_path):
    """distill checks the feature cache against the targets its own SpAD terms read (here: another layer map)."""
    from accelerate import Accelerator

    from pipeline.stages import StageContext, distill
    from teachers.cache import build_teacher_cache

    built = _recipe(tiny_teacher_dir)
    build_teacher_cache(teacher, prepared, tmp_path / "cache", k=8, value_dtype="fp32", progress=False,
                        temperature=built.distill.kd.temperature)
    build_features(built, teacher, str(prepared), tmp_path / "cache" / "features", progress=False)
    shape = {"num_layers": teacher.num_layers, "hidden_size": teacher.hidden_size, "num_heads": teacher.num_heads}
    upstream = {"prepare": {"outputs": {"dataset": str(prepared)}},
                "teacher_cache": {"outputs": {"cache": str(tmp_path / "cache"),
                                              "features": str(tmp_path / "cache" / "features")},
                                  "metrics": {"teacher_fingerprint": teacher.fingerprint, "teacher_shape": shape}}}
    recipe = _recipe(tiny_teacher_dir)
    recipe.teacher_cache.k, recipe.teacher.layer_map = 8, {0: 1}
    ctx = StageContext(recipe=recipe, run_dir=tmp_path, stage_dir=tmp_path / "distill", upstream=upstream,
                       accelerator=Accelerator(cpu=True), is_main=True, log=LOG)
    with pytest.raises(CacheError, match=r"built for other inputs \(layer_map=\[0, 1\] \(expected \[1, 1\]\)\)"):
        distill.run(ctx)


def test_after_align_distill_trains_from_the_feature_cache_without_loading_the_teacher(
        tiny_teacher_dir, teacher, prepared, tmp_path, monkeypatch):
    """With align's student there is nothing to size: distill takes the teacher's sizes from the teacher_cache
    stage's record and never loads it."""
    from accelerate import Accelerator

    from pipeline.stages import StageContext, align, distill
    from teachers.cache import build_teacher_cache

    recipe = _recipe(tiny_teacher_dir)
    recipe.teacher_cache.k, recipe.align.enabled = 8, True
    for section in (recipe.align, recipe.distill):
        section.train.steps, section.train.batch_size, section.train.eval_every, section.train.log_every = 2, 2, 2, 1
    recipe.distill.kd.chunk_size = 7
    build_teacher_cache(teacher, prepared, tmp_path / "cache", k=8, value_dtype="fp32", progress=False,
                        temperature=recipe.distill.kd.temperature)
    build_features(recipe, teacher, str(prepared), tmp_path / "cache" / "features", progress=False)
    shape = {"num_layers": teacher.num_layers, "hidden_size": teacher.hidden_size, "num_heads": teacher.num_heads}
    upstream = {"prepare": {"outputs": {"dataset": str(prepared)}},
                "teacher_cache": {"outputs": {"cache": str(tmp_path / "cache"),
                                              "features": str(tmp_path / "cache" / "features")},
                                  "metrics": {"teacher_fingerprint": teacher.fingerprint, "teacher_shape": shape}}}

    def ctx(name):
        return StageContext(recipe=recipe, run_dir=tmp_path, stage_dir=tmp_path / name, upstream=upstream,
                            accelerator=Accelerator(cpu=True), is_main=True, log=LOG)

    upstream["align"] = {"outputs": align.run(ctx("align")).outputs}
    monkeypatch.setattr(distill, "load_stage_teacher", lambda *a, **kw: pytest.fail("distill loaded the teacher"))
    distill.run(ctx("distill"))
    train = [x for x in _rows(tmp_path / "distill" / "metrics.jsonl") if x["split"] == "train"]
    assert len(train) == 2 and all(min(x[k] for k in ("ea", "saa", "sfa", "kd")) > 0 for x in train)


def test_raw_maps_are_never_read_as_mapped(tiny_teacher_dir, teacher, prepared, tmp_path):
    """A cache of learned head mapping holds the teacher's 4 raw heads: refused by a mean-mapping key in one
    line, and refused by the loss itself if read anyway (for a 1-head student they would broadcast silently)."""
    out = tmp_path / "features"
    build_features(_recipe(tiny_teacher_dir, head_mapping="learned"), teacher, str(prepared), out, progress=False)
    recipe = _recipe(tiny_teacher_dir, n_head=1)
    student = build_student(recipe, teacher.vocab_size)
    spad = build_spad(recipe, student, teacher, JOINT, LOG)
    with pytest.raises(CacheError, match=r"head_mapping='learned' \(expected 'mean'\)"):
        FeatureCache(out, expect=spad.target_spec.key())
    raw = SpADTargets.from_tensors(FeatureCache(out).batch([0, 1]))
    assert raw.maps[0].shape[1] == teacher.num_heads == 4
    ids = torch.stack([TokenDataset(prepared)[i] for i in (0, 1)])
    with pytest.raises(ValueError, match="have 4 heads; head_mapping 'mean' reads 1"):
        DistillObjective(student, JOINT, spad=spad)(ids, features=raw)


def test_an_interrupted_build_resumes_at_the_first_missing_shard(tiny_teacher_dir, teacher, prepared, tmp_path,
                                                                 monkeypatch):
    recipe, out = _recipe(tiny_teacher_dir), tmp_path / "features"
    real_write, calls = cache_mod._write_shard, []

    def dies_on_second(out_dir, i, tensors, first_row):
        calls.append(i)
        if len(calls) == 2:
            (out_dir / f".shard_{i:05d}.safetensors.tmp-1").write_bytes(b"half a shard")
            raise KeyboardInterrupt
        real_write(out_dir, i, tensors, first_row)

    monkeypatch.setattr("teachers.feature_cache.SHARD_ROWS", 4)
    monkeypatch.setattr(cache_mod, "_write_shard", dies_on_second)
    with pytest.raises(KeyboardInterrupt):
        build_features(recipe, teacher, str(prepared), out, progress=False)
    with pytest.raises(CacheError, match="incomplete"):
        FeatureCache(out)
    monkeypatch.setattr(cache_mod, "_write_shard", real_write)
    stats = build_features(recipe, teacher, str(prepared), out, progress=False)
    assert stats["shards"] == math.ceil(len(TokenDataset(prepared)) / 4) >= 3
    assert stats["shards_written"] == stats["shards"] - 1 and not list(out.glob(".shard_*"))
    fresh = tmp_path / "fresh"
    build_features(recipe, teacher, str(prepared), fresh, progress=False)
    resumed, whole = FeatureCache(out), FeatureCache(fresh)
    for row in range(len(whole)):
        assert all(torch.equal(resumed.row(row)[k], v) for k, v in whole.row(row).items())


def test_the_key_is_checked_and_only_feature_arms_hash_the_feature_settings():
    from pipeline.errors import ConfigError
    from pipeline.recipe import load_recipe
    from pipeline.runner import stage_config_hash

    kd, joint = "recipes/study/c_snn_kd.yaml", "recipes/study/g_snn_spad_joint.yaml"
    assert load_recipe(joint).teacher_cache.features and not load_recipe(kd).teacher_cache.features
    with pytest.raises(ConfigError, match="teacher_cache.features: must be false when distill has no feature term"):
        load_recipe(kd, ["teacher_cache.features=true"])
    with pytest.raises(ConfigError, match="teacher_cache.features: must be false unless teacher_cache.enabled"):
        load_recipe(joint, ["teacher_cache.enabled=false"])
    for override in ("align.head_mapping=learned", "align.sfa_target_norm=false", "student.config.n_head=2"):
        for path, moves in ((kd, False), (joint, True)):
            hashes = [stage_config_hash(load_recipe(path, extra), "teacher_cache") for extra in ([], [override])]
            assert (hashes[0] != hashes[1]) is moves, (path, override)


JOINT_RECIPE = """\
run: {{name: {name}, seed: 0}}
data: {{sources: [{corpus}], seq_len: 16, val_fraction: 0.1}}
teacher: {{spec: {teacher}, dtype: fp32}}
student: {{preset: tiny, config: {{n_layer: 2, d_model: 16, n_head: 2}}}}
teacher_cache: {{enabled: true, features: {features}, k: 8, value_dtype: fp32, batch_size: 4, dir: {cache}}}
align: {{enabled: false}}
distill:
  train: {{steps: 4, batch_size: 2, eval_every: 2, eval_batches: 1, checkpoint_every: 2, log_every: 1}}
  weights: {weights}
  kd: {{chunk_size: 7}}
"""


def _arm(tmp_path, teacher_dir, name: str, features: bool):
    from pipeline.recipe import load_recipe

    weights = "{ea: 0.2, saa: 0.1, sfa: 0.1, sta: 0.3, hta: 0.3}" if features else "{sta: 0.3, hta: 0.3}"
    (tmp_path / "corpus.txt").write_text(TEXT)
    path = tmp_path / f"{name}.yaml"
    path.write_text(JOINT_RECIPE.format(name=name, corpus=tmp_path / "corpus.txt", teacher=teacher_dir,
                                        features=str(features).lower(), weights=weights, cache=tmp_path / "shared"))
    return load_recipe(path)


def _rows(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_arms_with_and_without_features_share_one_cache_directory(tmp_path, tiny_teacher_dir):
    """The KD arm builds the logits only; the joint arm adds its features beside them, reusing every logit
    shard; the KD arm runs again after it without touching the features."""
    from pipeline.runner import run_pipeline

    shared, stages = tmp_path / "shared", ["prepare", "teacher_cache", "distill"]
    kd = _arm(tmp_path, tiny_teacher_dir, "kd", features=False)
    run_pipeline(kd, run_dir=tmp_path / "kd", stages=stages)
    assert (shared / "manifest.json").is_file() and not (shared / "features").exists()
    joint = _arm(tmp_path, tiny_teacher_dir, "joint", features=True)
    run_pipeline(joint, run_dir=tmp_path / "joint", stages=stages)
    done = json.loads((tmp_path / "joint" / "teacher_cache" / "done.json").read_text())
    assert done["metrics"]["shards_written"] == 0 and done["metrics"]["features"]["shards_written"] >= 1
    assert done["outputs"]["features"] == str(shared / "features")
    features_mtime = (shared / "features" / "manifest.json").stat().st_mtime_ns
    run_pipeline(kd, run_dir=tmp_path / "kd2", stages=stages)
    done = json.loads((tmp_path / "kd2" / "teacher_cache" / "done.json").read_text())
    assert "features" not in done["outputs"] and "features" not in done["metrics"]
    assert (shared / "features" / "manifest.json").stat().st_mtime_ns == features_mtime
    train = [x for x in _rows(tmp_path / "kd2" / "distill" / "metrics.jsonl") if x["split"] == "train"]
    assert len(train) == 4 and "ea" not in train[0] and train[0]["kd"] > 0


def test_joint_run_from_the_feature_cache_trains_resumes_and_exports_without_running_the_teacher(
        tmp_path, tiny_teacher_dir, monkeypatch, caplog):
    from safetensors.torch import load_file

    from pipeline.runner import run_pipeline
    from students import SpikeGPTForCausalLM
    from teachers.outputs import Teacher

    recipe, run = _arm(tmp_path, tiny_teacher_dir, "joint", features=True), tmp_path / "run"
    run_pipeline(recipe, run_dir=run, stages=["prepare", "teacher_cache"])
    batches = []
    call = Teacher.__call__
    monkeypatch.setattr(Teacher, "__call__", lambda self, ids, *a, **kw: (batches.append(tuple(ids.shape)),
                                                                          call(self, ids, *a, **kw))[1])
    run_pipeline(recipe, run_dir=run, stages=["distill", "export"])
    assert not [shape for shape in batches if shape[-1] == SEQ]  # only load_teacher's 8-token head check
    rows = _rows(run / "distill" / "metrics.jsonl")
    train, val = [x for x in rows if x["split"] == "train"], [x for x in rows if x["split"] == "val"]
    assert len(train) == 4 and all(min(x[k] for k in ("ea", "saa", "sfa", "kd", "ce")) > 0 for x in train)
    for x in train:
        want = 0.2 * x["ea"] + 0.1 * x["saa"] + 0.1 * x["sfa"] + 0.3 * x["kd"] + 0.3 * x["ce"]
        assert x["loss"] == pytest.approx(want, rel=1e-5)
    # validation rows have neither cached targets nor features: CE only (KD's sum is 0, no SpAD term)
    assert val and all(x["val_ce"] > 0 and x["val_kd"] == 0 and "val_saa" not in x for x in val)
    proj = load_file(run / "distill" / "projections.safetensors")
    student = load_file(run / "distill" / "student" / "model.safetensors")

    # resume: lose the last checkpoint and the stage's record; the rerun continues from step 2 to the same weights
    import shutil

    shutil.rmtree(run / "distill" / "checkpoints" / "step-0000004")
    (run / "distill" / "done.json").unlink()
    with caplog.at_level(logging.INFO, logger="pipeline.trainer"):
        run_pipeline(recipe, run_dir=run, stages=["distill"])
    assert any("resumed from" in m and "(step 2)" in m for m in caplog.messages)
    for before, after in ((proj, load_file(run / "distill" / "projections.safetensors")),
                          (student, load_file(run / "distill" / "student" / "model.safetensors"))):
        assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    model = SpikeGPTForCausalLM.from_pretrained(run / "export" / "model")
    assert all(torch.equal(v, student[k]) for k, v in model.state_dict().items() if k in student)
    assert not any("proj" in k for k in load_file(run / "export" / "model" / "model.safetensors"))
