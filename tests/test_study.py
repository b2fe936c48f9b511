"""The results study's machinery: recipe bases, the matched ANN baseline, the shared teacher cache, training
cost in done.json, `spikedistill study` end to end (tiny teacher, real CLI, one process per arm) and the
shipped recipes/study arms (one budget, one seed, one size)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
STUDY = ROOT / "recipes" / "study"


def test_a_recipe_merges_over_its_base_and_cycles_are_refused(tmp_path):
    (tmp_path / "base.yaml").write_text("run: {name: base, seed: 3}\ndata: {seq_len: 32, sources: [a, b]}\n")
    (tmp_path / "arm.yaml").write_text("base: base.yaml\nrun: {name: arm}\ndata: {sources: [c]}\n")
    r = load_recipe(tmp_path / "arm.yaml", ["data.seq_len=48"])
    assert (r.run.name, r.run.seed, r.data.seq_len, r.data.sources) == ("arm", 3, 48, ["c"])  # lists replaced
    (tmp_path / "x.yaml").write_text("base: y.yaml\n")
    (tmp_path / "y.yaml").write_text("base: x.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_recipe(tmp_path / "x.yaml")
    (tmp_path / "bad.yaml").write_text("base: [1]\n")
    with pytest.raises(ConfigError, match="base must be the path"):
        load_recipe(tmp_path / "bad.yaml")
    (tmp_path / "gone.yaml").write_text("base: missing.yaml\n")
    with pytest.raises(ConfigError, match="missing.yaml: recipe file not found"):
        load_recipe(tmp_path / "gone.yaml")


def test_the_ann_arch_refuses_spiking_only_settings():
    with pytest.raises(ConfigError, match=r"align\.enabled: must be false for student\.arch=llama"):
        load_recipe(None, ["student.arch=llama"])
    with pytest.raises(ConfigError, match=r"distill\.weights: must be sta/hta only"):
        load_recipe(None, ["student.arch=llama", "align.enabled=false", "distill.weights.ea=0.1"])
    with pytest.raises(ConfigError, match=r"student\.arch: must be one of spikegpt\|llama"):
        load_recipe(None, ["student.arch=gpt"])


def test_the_matched_llama_has_the_students_shape_and_trains_through_the_objective():
    from pipeline.build import build_student
    from pipeline.losses import DistillObjective
    from students import SpikeGPTForCausalLM
    from teachers.cache import topk_targets

    r = load_recipe(None, ["student.arch=llama", "align.enabled=false", "student.preset=tiny",
                           "student.config.n_layer=2", "student.config.d_model=32", "student.config.n_head=4"])
    ann = build_student(r, 64)
    cfg = ann.config
    assert type(ann).__name__ == "LlamaForCausalLM"
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.vocab_size,
            cfg.intermediate_size) == (2, 32, 4, 64, 128)
    r.student.arch = "spikegpt"
    snn = build_student(r, 64)
    assert isinstance(snn, SpikeGPTForCausalLM)
    # the same Linear budget per layer: 4 C^2 in the mixer/attention + 3 C F in the FFN/MLP
    ann_linear = sum(p.numel() for n, p in ann.model.layers.named_parameters() if p.dim() == 2)
    snn_linear = sum(p.numel() for n, p in snn.blocks.named_parameters() if p.dim() == 2)
    assert ann_linear == 2 * (4 * 32 * 32 + 3 * 32 * 128)
    assert abs(snn_linear - ann_linear) / ann_linear < 0.25

    ids = torch.randint(0, 64, (2, 9))
    ce_only = DistillObjective(ann, {"hta": 1.0})
    out = ce_only(ids)
    ref = torch.nn.functional.cross_entropy(ann(ids).logits[:, :-1].reshape(-1, 64), ids[:, 1:].reshape(-1),
                                            reduction="sum")
    torch.testing.assert_close(out["ce"], ref.detach(), rtol=1e-5, atol=1e-4)
    out["loss"].backward()
    assert ann.lm_head.weight.grad is not None and ann.model.layers[0].self_attn.q_proj.weight.grad is not None
    targets = topk_targets(torch.randn(2, 9, 64), 8)
    kd = DistillObjective(ann, {"sta": 0.5, "hta": 0.5}, kd={"kind": "forward_kl", "temperature": 2.0})(ids, targets)
    assert torch.isfinite(kd["kd"]) and kd["kd"] > 0


# Student tokens per teacher token on the study's text (the first 2,720,000 bytes of the bundled corpus),
# `tokens_per_teacher_token` in meta.json after `spikedistill run recipes/study/<arm>.yaml --stages prepare`:
# h_sub8k_ce 1.1706, i_sub4k_ce 1.2940, j_bytes_ce 4.3856
TOKENS_PER_TEACHER_TOKEN = {"teacher": 1.0, "subset:8192": 1.1706, "subset:4096": 1.2940, "bytes": 4.3856}


# arms that no goal of docs/results compares, cut to their sweep seed to keep the study near its time budget
ONE_SEED = {"a_ann_ce", "b_snn_ce_quarter"}


def test_shipped_study_arms_share_size_data_budget_seeds_and_sweep():
    """The shipped study: one dataset (a byte cap: the same text under any vocabulary), one budget in rows of the
    same text (an own vocabulary scales seq_len and the evaluation window by its tokens per teacher token), a
    full budget >= 4 x the old one (589,824 tokens), one learning-rate sweep for every arm, 3 seeds for every arm
    a goal compares (one for the CE-only ANN and the CE-only 1/4 budget, which no goal reads), the 1/4 series of
    CE-only and of inheritance + KD, and one teacher cache folder per vocabulary."""
    from pipeline.study import study_arms, study_recipes

    arms = study_recipes(STUDY)
    runs_dir, planned = study_arms(arms)
    assert runs_dir == Path("runs/study")
    recipes = {p.stem: load_recipe(p) for p in arms}
    rows, caches = {}, {}
    for stem, r in recipes.items():
        ratio = TOKENS_PER_TEACHER_TOKEN[r.student.vocab]
        assert (r.data.max_train_bytes, r.data.max_train_tokens, r.data.split_seed) == (2720000, None, 0)
        assert r.data.seq_len == pytest.approx(128 * ratio, rel=0.01), stem
        assert r.evaluate.context_length == pytest.approx(512 * ratio, rel=0.01), stem
        assert r.evaluate.teacher and r.evaluate.energy and not r.evaluate.stream
        assert list(r.study.seeds) == ([0] if stem in ONE_SEED else [0, 1, 2]), stem
        assert list(r.study.lr_grid) == [1e-3, 2e-3, 4e-3]
        assert r.study.lr_extensions == 3 and r.distill.train.optim.min_lr / r.distill.train.optim.lr == 0.05
        assert (r.distill.kd.kind, r.distill.kd.temperature, r.teacher_cache.k) == ("forward_kl", 1.0, 64)
        assert not r.align.enabled
        rows[stem] = r.distill.train.steps * r.distill.train.batch_size
        if r.teacher_cache.enabled:
            caches.setdefault(r.student.vocab, set()).add(r.teacher_cache.dir)
    # one cache folder per vocabulary (a cache is keyed by its data), under the study's runs directory
    assert all(len(dirs) == 1 for dirs in caches.values()) and len(set.union(*caches.values())) == len(caches)
    assert all(next(iter(dirs)).startswith("runs/study/_teacher_cache") for dirs in caches.values())
    full = rows["b_snn_ce"]
    assert full * 128 >= 4 * 144 * 8 * 128
    # at most one pass over the training split: 620,206 teacher tokens / 128 - 2% held out = 4,748 rows (4,737 of
    # 166 subset:4096 tokens, the fewest)
    assert full <= 4737
    for series in ("b_snn_ce", "f_inherit_kd"):
        assert rows.pop(f"{series}_quarter") == full // 4
    assert set(rows.values()) == {full}
    assert {a.name: a.seeds for a in planned} == {p.stem: (0,) if p.stem in ONE_SEED else (0, 1, 2) for p in arms}
    r = recipes
    assert r["a_ann_ce"].student.arch == "llama" and r["a_ann_ce"].distill.weights.sta == 0
    ann_kd = r["a_ann_inherit_kd"]
    assert ann_kd.student.arch == "llama" and ann_kd.student.init_from_teacher and ann_kd.teacher_cache.enabled
    assert (ann_kd.distill.weights.sta, ann_kd.distill.weights.hta) == (r["f_inherit_kd"].distill.weights.sta,
                                                                        r["f_inherit_kd"].distill.weights.hta)
    assert r["b_snn_ce"].distill.weights.sta == 0
    assert not r["b_snn_ce"].student.init_from_teacher and not r["b_snn_ce"].teacher_cache.enabled
    assert r["c_snn_kd"].distill.weights.sta > 0
    # joint SpAD: the five terms at BiSpikCLM's weights throughout distill, no align stage, STA from the cache
    joint = r["g_snn_spad_joint"]
    assert vars(joint.distill.weights) == {"ea": 0.2, "saa": 0.1, "sfa": 0.1, "sta": 0.3, "hta": 0.3}
    assert joint.teacher_cache.enabled and joint.distill.use_teacher_cache
    assert r["e_inherit_ce"].student.init_from_teacher and r["e_inherit_ce"].distill.weights.sta == 0
    assert r["f_inherit_kd"].student.init_from_teacher and r["f_inherit_kd"].distill.weights.sta > 0
    # the vocabulary arms: CE-only and inheritance + KD per vocabulary, everything else as the 49k arms
    for ce, kd, vocab in (("h_sub8k_ce", "h_sub8k_inherit_kd", "subset:8192"),
                          ("i_sub4k_ce", "i_sub4k_inherit_kd", "subset:4096"), ("j_bytes_ce", "j_bytes_inherit_kd", "bytes")):
        assert r[ce].student.vocab == r[kd].student.vocab == vocab
        assert r[ce].distill.weights.sta == 0 and not r[ce].student.init_from_teacher
        assert vars(r[kd].distill.weights) == vars(r["f_inherit_kd"].distill.weights) and r[kd].student.init_from_teacher
    wall = r["k_sub4k_inherit_kd_walltime"]
    assert wall.student.config == {"n_layer": 7, "d_model": 256} and wall.student.vocab == "subset:4096"
    assert all(x.student.config == {} and x.student.preset == "demo" for k, x in r.items() if "walltime" not in k)
    # held-out scores over at least 100 kB of each text (both texts are longer), the same cut for every arm
    from eval.bpb import cut_text, read_eval_text

    assert len({(x.evaluate.max_text_bytes, tuple(x.evaluate.texts)) for x in r.values()}) == 1
    e = r["b_snn_ce"].evaluate
    for name in e.texts:
        assert len(cut_text(read_eval_text(name), e.max_text_bytes).encode()) >= 100_000


def test_study_refuses_an_unknown_arm_and_an_empty_folder(tmp_path):
    from pipeline.study import study_recipes

    with pytest.raises(ConfigError, match="no recipe zz"):
        study_recipes(STUDY, ["zz"])
    (tmp_path / "_base.yaml").write_text("run: {name: x}\n")
    with pytest.raises(ConfigError, match="no \\*.yaml recipes"):
        study_recipes(tmp_path)


BASE = """\
run: {{seed: 0, runs_dir: {runs}}}
data: {{sources: [{corpus}], seq_len: 16, val_fraction: 0.1, split_seed: 0}}
teacher: {{spec: {teacher}, dtype: fp32}}
student: {{preset: tiny, config: {{n_layer: 1, d_model: 16, n_head: 2}}}}
teacher_cache: {{enabled: false, k: 4, value_dtype: fp32, batch_size: 4, dir: {cache}}}
align: {{enabled: false}}
distill:
  train: {{steps: 4, batch_size: 2, eval_every: 2, eval_batches: 1, checkpoint_every: 2, log_every: 1}}
  weights: {{sta: 0.0, hta: 1.0}}
  kd: {{chunk_size: 8}}
evaluate: {{texts: [persuasion, hamlet], max_text_bytes: 300, context_length: 32, energy: true, teacher: true,
           sample_tokens: 2}}
"""


def _tiny_study(tmp_path, teacher) -> tuple[Path, Path, Path]:
    """A study folder over the tiny teacher: a_ann (one run), c_kd with seeds 0 and 1, h_kd_half = c_kd at half
    the steps (inherits the seeds); returns (folder, runs dir, shared cache dir)."""
    text = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, must be "
            "in want of a wife. ") * 30
    (tmp_path / "corpus.txt").write_text(text)
    folder, runs, cache = tmp_path / "study", tmp_path / "runs", tmp_path / "shared_cache"
    folder.mkdir()
    (folder / "_base.yaml").write_text(BASE.format(runs=runs, corpus=tmp_path / "corpus.txt", teacher=teacher,
                                                   cache=cache))
    (folder / "a_ann.yaml").write_text("base: _base.yaml\nrun: {name: a_ann}\nstudent: {arch: llama}\n")
    (folder / "c_kd.yaml").write_text("base: _base.yaml\nrun: {name: c_kd}\nteacher_cache: {enabled: true}\n"
                                      "distill: {weights: {sta: 0.5, hta: 0.5}}\nstudy: {seeds: [0, 1]}\n")
    (folder / "h_kd_half.yaml").write_text("base: c_kd.yaml\nrun: {name: h_kd_half}\ndistill: {train: {steps: 2}}\n")
    return folder, runs, cache


@pytest.mark.slow
def test_study_runs_every_arm_and_seed_reports_and_resumes(tmp_path, tiny_teacher_dir):
    from eval.study_report import SUMMARY_KEYS
    from pipeline.cli import main

    folder, runs, cache = _tiny_study(tmp_path, tiny_teacher_dir)
    report = tmp_path / "report"
    assert main(["study", str(folder), "--out", str(report)]) == 0
    board = json.loads((report / "leaderboard.json").read_text())
    students = {r["run"]: r for r in board["rows"] if r["role"] == "student"}
    assert set(students) == {"a_ann", "c_kd-s0", "c_kd-s1", "h_kd_half-s0", "h_kd_half-s1"}
    assert [r["role"] for r in board["rows"]].count("teacher") == 1
    assert students["a_ann"]["label"].startswith("llama") and students["a_ann"]["mean_firing_rate"] is None
    assert students["c_kd-s0"]["module_firing_rate"] is not None
    for run, row in students.items():
        t = row["train"]
        assert t["tokens"] == (2 if run.startswith("h_") else 4) * 2 * 15  # steps x rows x next-token targets
        assert t["tokens_per_s"] > 0 and t["wall_seconds"] > 0 and t["curve"]
        assert row["ratio_to_teacher"] is not None and row["mean_bits_per_byte"] > 0
    # the seeds really differ (run.seed reached the runs), and seeds and budgets share one series
    assert students["c_kd-s0"]["bits_per_byte"] != students["c_kd-s1"]["bits_per_byte"]
    series = {run: row["train"]["series"] for run, row in students.items()}
    assert len({series[r] for r in series if r != "a_ann"}) == 1 and series["a_ann"] != series["c_kd-s0"]
    # the teacher cache was built once, in the shared folder, by the first KD run
    built = {r: json.loads((runs / r / "teacher_cache" / "done.json").read_text())["metrics"]["shards_written"]
             for r in students if r != "a_ann"}
    assert built.pop("c_kd-s0") >= 1 and set(built.values()) == {0} and (cache / "manifest.json").is_file()

    summary = json.loads((report / "summary.json").read_text())
    assert [(r["arm"], r["seed"], r["kind"], r["budget"]) for r in summary] == [
        ("a_ann", None, "ann_ce", 1.0), ("c_kd", 0, "snn_distill", 1.0), ("c_kd", 1, "snn_distill", 1.0),
        ("h_kd_half", 0, "snn_distill", 0.5), ("h_kd_half", 1, "snn_distill", 0.5)]
    for rec in summary:
        run = rec["arm"] if rec["seed"] is None else f"{rec['arm']}-s{rec['seed']}"
        assert list(rec) == list(SUMMARY_KEYS) and rec["lr"] == 6e-4 and rec["val_bpb"] > 0
        assert rec["vocab_size"] == students[run]["vocab_size"] > 0 and rec["compute_pj_per_byte"] > 0
        assert rec["bpb_persuasion_ci95"] is None  # 300 bytes: one 4 KiB block, no interval
        assert rec["train_tokens"] == students[run]["train"]["tokens"]
        assert rec["bpb_persuasion"] == students[run]["bits_per_byte"]["persuasion"] and rec["bpb_hamlet"] > 0
    study_md = (report / "study.md").read_text()
    assert "| c_kd | snn_distill | teacher | 1.00 | 0.0006 | 0,1 |" in study_md and "Goals" in study_md
    # every run says which code trained it: this checkout's commit (read here with git, independently)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parent.parent).stdout.strip()
    assert {r["code_commit"] for r in summary} == {head} and all(isinstance(r["code_dirty"], bool) for r in summary)
    assert f"Code that trained the runs (git commit, from each run's distill/done.json): {head[:10]}" in study_md
    # energy-only reference rows: the teacher once, the student's quantised matched ANN (int8, ternary)
    assert study_md.count("(teacher) |") == 1 and study_md.count("(quantised ANN) |") == 2
    for name in ("leaderboard.md", "bpb_vs_energy.png", "learning_curves.png", "token_efficiency.png"):
        assert (report / name).stat().st_size > 0
    assert not (report / "task_accuracy.png").exists()  # no run scored a task: no empty chart

    done = {r: (runs / r / "distill" / "done.json").stat().st_mtime_ns for r in students}
    assert main(["study", str(folder), "--out", str(report)]) == 0  # resumable: all skipped
    assert {r: (runs / r / "distill" / "done.json").stat().st_mtime_ns for r in students} == done

    # archived records (no weights) rebuild the same report on a machine without the runs directory
    archive = tmp_path / "archive"
    assert main(["study", str(folder), "--out", str(report), "--report-only", "--archive", str(archive)]) == 0
    assert {p.name for p in archive.iterdir()} == set(students)
    assert not list(archive.rglob("*.safetensors")) and not list(archive.rglob("*.pt"))
    # another machine: no runs directory, and the study's folders elsewhere (a clone at another path)
    shutil.rmtree(runs)
    base = (folder / "_base.yaml").read_text()
    (folder / "_base.yaml").write_text(base.replace(str(runs), str(tmp_path / "elsewhere" / "runs")))
    again = tmp_path / "report_again"
    assert main(["study", str(folder), "--out", str(again), "--report-only", "--archive", str(archive)]) == 0
    assert json.loads((again / "summary.json").read_text()) == summary
    assert (again / "study.md").read_text() == study_md
    rows = json.loads((again / "leaderboard.json").read_text())["rows"]
    assert rows == board["rows"]


@pytest.mark.slow
def test_study_jobs_build_the_shared_cache_once_then_train_in_parallel(tmp_path, tiny_teacher_dir):
    from pipeline.cli import main

    folder, runs, cache = _tiny_study(tmp_path, tiny_teacher_dir)
    (folder / "a_ann.yaml").unlink()
    assert main(["study", str(folder), "--out", str(tmp_path / "report"), "--jobs", "2"]) == 0
    names = ["c_kd-s0", "c_kd-s1", "h_kd_half-s0", "h_kd_half-s1"]
    built = {r: json.loads((runs / r / "teacher_cache" / "done.json").read_text())["metrics"]["shards_written"]
             for r in names}
    *others, builder = sorted(built.values())
    assert builder >= 1 and others == [0, 0, 0] and (cache / "manifest.json").is_file()
    for r in names:
        assert json.loads((runs / r / "evaluate" / "done.json").read_text())["stage"] == "evaluate"
        assert "evaluate" in (runs / r / "study.log").read_text()
    assert len(json.loads((tmp_path / "report" / "summary.json").read_text())) == 4


def test_schedule_gives_a_waiting_runs_slot_to_a_run_that_can_go():
    """Two slots, a cache build that needs 'y' to be running before it finishes, 'x' that reads the cache queued
    before 'y': a scheduler that parks 'x' in the second slot would deadlock (the build times out)."""
    import threading

    from pipeline.study import _schedule

    events, y_started = [], threading.Event()

    def build():
        events.append("build")
        assert y_started.wait(timeout=20), "y never started: x held the second slot while waiting for the cache"
        events.append("built")

    def y():
        events.append("y")
        y_started.set()

    _schedule([("cache", set(), build), ("x", {"cache"}, lambda: events.append("x")), ("y", set(), y)], jobs=2)
    assert events.index("y") < events.index("built") < events.index("x")

    def boom():
        raise RuntimeError("run failed")

    ran = []
    with pytest.raises(RuntimeError, match="run failed"):
        _schedule([("a", set(), boom), ("b", {"a"}, lambda: ran.append("b"))], jobs=2)
    assert ran == []  # what needs a failed task never starts


# ---------------------------------------------------------------- the study report: records, statistics, goals


def _arm(arm, pers, ham, kind="snn_distill", role="inherit_kd", vocab="teacher", budget=1.0, series=None,
         hw=0.05, **fields):
    """Summary records of one arm, one per seed (len(pers) seeds), with a 95% interval of half-width hw."""
    return [{"arm": arm, "run": f"{arm}-s{i}", "seed": i, "series": series or arm, "kind": kind, "role": role,
             "vocab": vocab, "walltime": "walltime" in arm, "budget": budget, "bpb_persuasion": p, "bpb_hamlet": h,
             "bpb_persuasion_ci95": [p - hw, p + hw], "bpb_hamlet_ci95": [h - hw, h + hw], **fields}
            for i, (p, h) in enumerate(zip(pers, ham))]


def _study() -> list[dict]:
    """A study whose goals are worked out by hand in test_goals_met_not_met_and_not_answered."""
    ce = _arm("ce", [2.40, 2.42, 2.44], [3.20, 3.22, 3.24], kind="snn_ce", role="ce")
    kd = _arm("kd", [2.30, 2.31, 2.32], [3.00, 3.01, 3.02], role="logit_kd")
    inh = _arm("inh_kd", [2.20, 2.21, 2.22], [2.90, 2.91, 2.92], compute_pj_per_byte=4e5, memory_pj_per_byte=4e8)
    quarter = _arm("inh_kd_q", [2.45, 2.46, 2.47], [3.10, 3.11, 3.12], budget=0.25, series="inh_kd")
    joint = _arm("g_spad_joint", [2.25, 2.26, 2.27], [2.95, 2.96, 2.97], role="spad_joint")
    ann = _arm("a_ann_kd", [2.18], [2.95], kind="ann_kd", role="ann_kd")
    v_ce = _arm("v_ce", [2.50, 2.51, 2.52], [3.3] * 3, kind="snn_ce", role="ce", vocab="subset:1024")
    v_kd = _arm("v_kd", [2.30, 2.31, 2.32], [3.1] * 3, vocab="subset:1024")
    b_ce = _arm("b_ce", [2.600, 2.610, 2.620], [3.4] * 3, kind="snn_ce", role="ce", vocab="bytes")
    b_kd = _arm("b_kd", [2.595, 2.605, 2.615], [3.4] * 3, vocab="bytes")
    wall = _arm("v_kd_walltime", [2.15, 2.16, 2.17], [2.85, 2.86, 2.87], vocab="subset:1024", budget=1.6,
                compute_pj_per_byte=1e5, memory_pj_per_byte=1e8, ternary_compute_pj_per_byte=2e5,
                ternary_memory_pj_per_byte=5e7, params=100, params_embedding=20, params_head=20, params_body=60,
                train_seconds=50.0)
    for r in inh:
        r["train_seconds"] = 50.0
    return ce + kd + inh + quarter + joint + ann + v_ce + v_kd + b_ce + b_kd + wall


def test_arm_stats_by_hand():
    from eval.study_report import arm_stats

    stats = {s["arm"]: s for s in arm_stats(_study())}
    ce = stats["ce"]
    assert ce["bpb_persuasion"] == pytest.approx(2.42) and ce["bpb_persuasion_std"] == pytest.approx(0.02)
    assert ce["bpb_hamlet_hw"] == pytest.approx(0.05) and ce["bpb_mean"] == pytest.approx((2.42 + 3.22) / 2)
    assert stats["a_ann_kd"]["bpb_persuasion_std"] is None and stats["v_kd_walltime"]["walltime"] is True
    assert (ce["role"], ce["vocab"], ce["seeds"], ce["n"]) == ("ce", "teacher", [0, 1, 2], 3)


def test_goals_met_not_met_and_not_answered():
    """Every goal on a hand-built study, then with the arm it needs removed."""
    from eval.study_report import arm_stats, goals, goals_markdown

    a = goals(arm_stats(_study()))
    # (i) inh_kd (lowest mean over the texts among the distillation arms) vs ce: Persuasion gain 0.21 over a pooled
    # seed std sqrt((0.02^2 + 0.01^2) / 2), Hamlet 0.31; bootstrap: sqrt(0.05^2 + 0.05^2) = 0.0707
    noise = ((0.02**2 + 0.01**2) / 2) ** 0.5
    (p, h) = a["i"]["comparisons"]
    assert (a["i"]["arm"], a["i"]["baseline"], a["i"]["met"]) == ("inh_kd", "ce", True)
    assert p["gain"] == pytest.approx(0.21) and p["noise_std"] == pytest.approx(noise)
    assert p["gain_in_sigmas"] == pytest.approx(0.21 / noise) and h["gain"] == pytest.approx(0.31)
    assert p["ci_half_width"] == pytest.approx(0.05 * 2**0.5) and p["beyond_ci"] is True
    # (ii) inh_kd_q at 1/4: 2.46 and 3.11 against ce's 2.42 and 3.22: worse on Persuasion
    assert (a["ii"]["arm"], a["ii"]["met"], a["ii"]["of_best"]) == ("inh_kd_q", False, True)
    assert [c["gain"] for c in a["ii"]["comparisons"]] == pytest.approx([-0.04, 0.11])
    # (iii) joint vs kd: gains 0.05 and 0.05 over a pooled std 0.01: 5 sigma each
    assert (a["iii"]["arm"], a["iii"]["baseline"], a["iii"]["met"]) == ("g_spad_joint", "kd", True)
    assert [c["gain_in_sigmas"] for c in a["iii"]["comparisons"]] == pytest.approx([5.0, 5.0])
    # (iv) inh_kd - ann: +0.03 on Persuasion, -0.04 on Hamlet: within 0.05 on both
    assert a["iv"]["met"] is True and [-c["gain"] for c in a["iv"]["comparisons"]] == pytest.approx([0.03, -0.04])
    # (a) subset:1024 gains 0.2 (20 sigma), bytes 0.005 (0.5 sigma): not met
    assert a["a"]["vocabs"]["subset:1024"]["met"] is True and a["a"]["vocabs"]["bytes"]["met"] is False
    assert a["a"]["met"] is False
    # (b) the walltime arm 2.16 / 2.86 against the best teacher-vocabulary student inh_kd 2.21 / 2.91
    assert (a["b"]["arm"], a["b"]["baseline"], a["b"]["met"]) == ("v_kd_walltime", "inh_kd", True)
    assert a["b"]["train_seconds"] == [50.0, 50.0]
    # (c) 1e5 <= 4e5 / 3 and 1e8 <= 4e8 / 3; below its ternary ANN in compute (2e5) but not memory (5e7)
    assert a["c"]["checks"] == {"compute_vs_reference": True, "compute_vs_ternary": True,
                                "memory_vs_reference": True, "memory_vs_ternary": False}
    assert a["c"]["met"] is False and a["c"]["baseline"] == "inh_kd"
    # (d) 60 of 100 parameters in the body
    assert a["d"]["met"] is True and a["d"]["body_share"] == pytest.approx(0.6)
    text = goals_markdown(a)
    for line in ("- (i) **met**", "- (ii) **not met**", "- (iii) **met**", "- (iv) **met**", "- (a) **not met**",
                 "  - (bytes) **not met**", "- (b) **met**", "- (c) **not met**", "- (d) **met**"):
        assert line in text, line
    assert "embedding 20, LM head 20, body 60 (60% in the body" in text
    assert "failed: memory_vs_ternary" in text and "= 13.3 sigma (pooled seed std 0.016)" in text

    # a gain inside the seed noise is not met
    noisy = [r | {"bpb_persuasion": r["bpb_persuasion"] - 0.2} if r["arm"] == "ce" else r for r in _study()]
    close = goals(arm_stats(noisy))["i"]
    assert close["met"] is False and close["comparisons"][0]["gain"] == pytest.approx(0.01)
    # ... on either text: Hamlet 0.01 ahead, Persuasion still 0.21
    noisy = [r | {"bpb_hamlet": r["bpb_hamlet"] - 0.3} if r["arm"] == "ce" else r for r in _study()]
    assert goals(arm_stats(noisy))["i"]["met"] is False
    # (iv) the spiking student 0.11 worse than the distilled Llama on Persuasion; (c) at 0.375 of the reference
    worse = [r | {"bpb_persuasion": 2.10} if r["arm"] == "a_ann_kd" else r for r in _study()]
    worse = [r | {"compute_pj_per_byte": 1.5e5} if r["arm"] == "v_kd_walltime" else r for r in worse]
    w = goals(arm_stats(worse))
    assert w["iv"]["met"] is False and w["c"]["checks"]["compute_vs_reference"] is False
    # missing arms: not answered
    gone = [r for r in _study() if r["arm"] not in ("g_spad_joint", "a_ann_kd", "ce")]
    b = goals(arm_stats(gone))
    assert b["i"]["met"] is None and b["ii"]["met"] is None and b["iii"]["met"] is None and b["iv"]["met"] is None
    teacher_only = [r for r in _study() if r["vocab"] == "teacher"]
    c = goals(arm_stats(teacher_only))
    assert all(c[k]["met"] is None for k in ("a", "b", "c", "d")) and c["i"]["met"] is True
    text = goals_markdown(c)
    assert "- (a) **not answered**: no vocabulary arm" in text and "- (b) **not answered**: no best equal-wall-time" \
        in text and "- (d) **not answered**" in text
    # one seed per arm: (i) cannot be answered, (ii) still can
    single = goals(arm_stats([r for r in _study() if r["seed"] == 0]))
    assert single["i"]["met"] is None and single["ii"]["met"] is False
    assert "seed noise unknown" in goals_markdown(single)
    # without a walltime arm, (c) and (d) take the best own-vocabulary arm at the full budget
    no_wall = goals(arm_stats([r for r in _study() if "walltime" not in r["arm"]]))
    assert no_wall["b"]["met"] is None and no_wall["c"]["arm"] == "v_kd" and no_wall["d"]["arm"] == "v_kd"


def test_run_kind_and_arm_role_from_the_resolved_config():
    from eval.study_report import arm_role, run_kind, student_vocab

    ce = {"student": {"arch": "spikegpt"}, "align": {"enabled": False}, "distill": {"weights": {"sta": 0.0}}}
    kd = {**ce, "distill": {"weights": {"sta": 0.3, "hta": 0.3}}}
    inherit = {"student": {"arch": "spikegpt", "init_from_teacher": True}}
    assert run_kind(ce) == "snn_ce" and arm_role(ce, "b_snn_ce") == "ce"
    assert run_kind({**ce, "student": {"arch": "llama"}}) == "ann_ce"
    ann_kd = {**kd, "student": {"arch": "llama", "init_from_teacher": True}}
    assert run_kind(ann_kd) == "ann_kd" and arm_role(ann_kd, "a_ann_inherit_kd") == "ann_kd"
    assert run_kind(kd) == "snn_distill" and arm_role(kd, "c_snn_kd") == "logit_kd"
    assert arm_role({**kd, **inherit}, "f_inherit_kd") == "inherit_kd"
    assert arm_role({**ce, **inherit}, "e_inherit_ce") == "inherit_ce"
    assert arm_role({**kd, "align": {"enabled": True}}, "d_snn_spad") == "spad_align"
    joint = {**ce, "distill": {"weights": {"ea": 0.2, "saa": 0.1, "sfa": 0.1, "sta": 0.3, "hta": 0.3}}}
    assert arm_role(joint, "g_snn_spad_joint") == "spad_joint" and arm_role(joint, "h_features") == "other_distill"
    assert run_kind({**ce, "align": {"enabled": True}}) == "snn_distill"
    assert student_vocab(ce) == "teacher" and student_vocab({"student": {"vocab": "subset:4096"}}) == "subset:4096"


def _fake_run(runs: Path, name: str, config: str, bytes_per_token: float, tokens_seen: float, seconds: float,
              val_bpb: float, held_out: dict, teacher_held_out: dict, energy: dict, info: dict) -> None:
    """A run directory as the pipeline leaves it, with only what the leaderboard and the report read."""
    from eval.leaderboard import collect_results

    run = runs / name
    for stage, metrics in (("prepare", {"bytes_per_token": bytes_per_token}),
                           ("distill", {"tokens_seen": tokens_seen, "train_seconds": seconds,
                                        "val_bits_per_byte": val_bpb})):
        (run / stage).mkdir(parents=True)
        (run / stage / "done.json").write_text(json.dumps({"stage": stage, "metrics": metrics, "wall_seconds": 1.0}))
    (run / "distill" / "metrics.jsonl").write_text(json.dumps(
        {"step": 4, "split": "val", "tokens_seen": tokens_seen, "val_bits_per_byte": val_bpb}) + "\n")
    (run / "config.yaml").write_text(config)
    (run / "evaluate").mkdir()
    (run / "evaluate" / "results.json").write_text(json.dumps(collect_results(
        name, f"{run}/export/model", held_out, energy=energy, teacher_name="T", teacher_bpb=teacher_held_out,
        model_info=info)))


def _bpb(value: float, tokens: int, n_bytes: int, half: float) -> dict:
    return {"bits_per_byte": value, "tokens": tokens, "bytes": n_bytes,
            "interval": {"low": value - half, "high": value + half, "half_width": half}}


def test_summary_records_by_hand_from_run_directories(tmp_path):
    """Every new summary field of two hand-built runs, computed by hand; then summary.json and study.md."""
    from eval.leaderboard import build_leaderboard
    from eval.study_report import SUMMARY_KEYS, StudyRun, summary_records, write_study_report

    runs = tmp_path / "runs"
    teacher = {"persuasion": _bpb(1.2, 100, 1000, 0.02), "hamlet": _bpb(1.5, 100, 1000, 0.03)}
    energy = {"context_length": 512, "totals": {"sops": 1.0, "macs": 1.0, "energy_pj": 2e6, "mean_firing_rate": 0.2},
              "figures": {"compute_pj": 2e6, "memory_inclusive_pj": 1e9, "head_share_compute": 0.5,
                          "head_share_memory_inclusive": 0.5},
              "quantised": {"ternary": {"model": "llama", "compute_pj": 1e6, "memory_inclusive_pj": 3e8,
                                        "head_share_compute": 0.5, "head_share_memory_inclusive": 0.5}}}
    info = {"params": 100, "params_embedding": 30, "params_head": 30, "params_body": 40, "vocab_size": 1024}
    _fake_run(runs, "v_ce-s0", "run: {name: v_ce-s0}\nstudent: {arch: spikegpt, vocab: 'subset:1024'}\n"
              "distill: {train: {optim: {lr: 0.004}}, weights: {sta: 0.0, hta: 1.0}}\n",
              bytes_per_token=2.5, tokens_seen=1000, seconds=4.0, val_bpb=1.9,
              held_out={"persuasion": _bpb(2.1, 300, 1000, 0.1), "hamlet": _bpb(3.1, 500, 1000, 0.2)},
              teacher_held_out=teacher, energy=energy, info=info)
    _fake_run(runs, "f_kd-s0", "run: {name: f_kd-s0}\nstudent: {arch: spikegpt, init_from_teacher: true}\n"
              "distill: {train: {optim: {lr: 2.0e-3}}, weights: {sta: 0.3, hta: 0.3}}\n",
              bytes_per_token=4.0, tokens_seen=500, seconds=5.0, val_bpb=1.7,
              held_out={"persuasion": _bpb(2.0, 100, 1000, 0.1), "hamlet": _bpb(3.0, 100, 1000, 0.1)},
              teacher_held_out=teacher, energy=energy, info=info | {"vocab_size": 49152})
    rows = build_leaderboard(runs, tmp_path / "lb")["rows"]
    study = [StudyRun("v_ce-s0", "v_ce", 0), StudyRun("f_kd-s0", "f_kd", 0)]
    ce, kd = summary_records(rows, study, runs)[1], summary_records(rows, study, runs)[0]
    assert (ce["arm"], ce["kind"], ce["role"], ce["vocab"], ce["lr"]) == ("v_ce", "snn_ce", "ce", "subset:1024", 0.004)
    assert (kd["role"], kd["vocab"], kd["lr"]) == ("inherit_kd", "teacher", 0.002)
    assert ce["val_bpb"] == 1.9 and kd["val_bpb"] == 1.7  # the distill stage's, not a held-out score
    assert ce["vocab_size"] == 1024 and kd["vocab_size"] == 49152
    # held-out tokens per byte under the run's own tokenizer: (300 + 500) / 2000; the teacher's is 200 / 2000
    assert ce["tokens_per_byte"] == pytest.approx(0.4) and kd["tokens_per_byte"] == pytest.approx(0.1)
    assert ce["train_tokens_per_byte"] == pytest.approx(1 / 2.5) and ce["train_tokens_per_s"] == pytest.approx(250)
    assert ce["train_bytes_per_s"] == pytest.approx(250 * 2.5) and ce["train_seconds"] == 4.0
    assert ce["compute_pj_per_byte"] == pytest.approx(2e6 * 0.4) and ce["memory_pj_per_byte"] == pytest.approx(4e8)
    assert kd["compute_pj_per_byte"] == pytest.approx(2e6 * 0.1)
    assert ce["ternary_compute_pj_per_byte"] == pytest.approx(4e5)
    assert ce["ternary_memory_pj_per_byte"] == pytest.approx(1.2e8)
    assert ce["bpb_persuasion_ci95"] == pytest.approx([2.0, 2.2]) and ce["bpb_hamlet_ci95"] == pytest.approx([2.9, 3.3])
    assert (ce["params"], ce["params_embedding"], ce["params_head"], ce["params_body"]) == (100, 30, 30, 40)
    # budget in training bytes: 1000 x 2.5 = 2500 against 500 x 4 = 2000 (in tokens it would be 0.5)
    assert (ce["train_bytes"], kd["train_bytes"]) == (2500, 2000) and (ce["budget"], kd["budget"]) == (1.0, 0.8)

    files = write_study_report(rows, study, runs, tmp_path / "report")
    summary = json.loads(Path(files["summary"]).read_text())
    assert [list(r) for r in summary] == [list(SUMMARY_KEYS)] * 2 and summary[1]["lr"] == 0.004
    md = Path(files["study"]).read_text()
    assert md.index("## Goals (stated before the runs)") < md.index("## Held-out texts") < md.index("| arm |") \
        < md.index("## Goals, answered")
    assert "probably seen" in md and "(Persuasion 1,000 bytes, Hamlet 1,000 bytes)" in md
    # v_ce: val 1.9, 2.100 [±0.100], 0.4 tokens/byte, 250 tok/s, 625 bytes/s, 2 µJ/token, 0.8 µJ/byte
    assert ("| v_ce | snn_ce | subset:1024 | 1.00 | 0.004 | 0 | 1,000 | 1.900 | 2.100 [±0.100] | 3.100 [±0.200] "
            "| 0.4000 | 250 | 625 | 2.00 | 1,000.00 | 0.800 | 400.000 | 0.200 |") in md
    # the teacher row: its own tokens per byte (0.1) and bootstrap half-widths
    assert "| T (teacher) |  |  |  |  |  |  |  | 1.200 [±0.020] | 1.500 [±0.030] | 0.1000 |" in md
    assert "- (i) **not answered**" in md


@pytest.mark.slow
def test_evaluate_stage_scores_with_intervals_and_the_teacher_once(tmp_path, tiny_teacher_dir, monkeypatch):
    """The evaluate stage on 9,000 bytes of each held-out text: student and teacher scores carry a bootstrap
    interval over ceil(9,000 / 4,096) = 3 blocks; the energy is per byte with the student's tokens per byte;
    a second run reads the teacher's scores from the cache instead of scoring it again."""
    from pipeline.cli import main

    monkeypatch.setenv("SPIKEDISTILL_CACHE", str(tmp_path / "cache"))
    folder, runs, _ = _tiny_study(tmp_path, tiny_teacher_dir)
    recipe = folder / "c_kd.yaml"
    size = ["evaluate.max_text_bytes=9000", "evaluate.sample_tokens=0", "teacher_cache.enabled=false"]
    assert main(["run", str(recipe), *size, "run.name=one"]) == 0
    scores = sorted((tmp_path / "cache" / "teacher_scores").glob("*.json"))
    res = json.loads((runs / "one" / "evaluate" / "results.json").read_text())
    for who in ("student", "teacher"):
        for row in res[who]["bpb"].values():
            assert row["bytes"] <= 9000 and row["interval"]["blocks"] == math.ceil(row["bytes"] / 4096) == 3
            assert row["interval"]["low"] <= row["bits_per_byte"] <= row["interval"]["high"]
    student = res["student"]
    tpb = sum(v["tokens"] for v in student["bpb"].values()) / sum(v["bytes"] for v in student["bpb"].values())
    energy_md = (runs / "one" / "evaluate" / "energy.md").read_text()
    assert f"| {tpb:.4f} |" in energy_md  # per byte with the held-out texts' tokens per byte
    assert main(["run", str(recipe), *size, "run.name=two", "run.seed=1"]) == 0
    assert sorted((tmp_path / "cache" / "teacher_scores").glob("*.json")) == scores  # nothing new: cached
    again = json.loads((runs / "two" / "evaluate" / "results.json").read_text())
    assert again["teacher"]["bpb"] == res["teacher"]["bpb"] and again["student"]["bpb"] != student["bpb"]


def test_make_studys_archive_folder_is_kept_by_git():
    """The records make study archives must reach git: a folder that .gitignore matches (as `runs/` once
    matched docs/results/runs) would leave a fresh clone nothing to restore."""
    root = Path(__file__).resolve().parent.parent
    make = (root / "Makefile").read_text()
    folder = make.split("--archive ", 1)[1].split()[0]
    assert folder == "docs/results/runs"
    ignored = subprocess.run(["git", "check-ignore", "-q", f"{folder}/a-run/distill/done.json"], cwd=root,
                             check=False).returncode
    assert ignored == 1  # 1: not ignored; 0 would mean git drops the archive
