"""The results study's machinery: recipe bases, the matched ANN baseline, the shared teacher cache, training
cost in done.json, `spikedistill study` end to end (tiny teacher, real CLI, one process per arm) and the
shipped recipes/study arms (one budget, one seed, one size)."""

from __future__ import annotations

import json
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


def test_shipped_study_arms_share_size_data_budget_and_seeds():
    """The shipped study: one student size and dataset, a full budget >= 4 x the old one (589,824 tokens), 3 seeds
    for every arm but the matched ANN, and the 1/4 and 1/2 series of CE-only and of the inherit+KD arm."""
    from pipeline.study import study_recipes, study_runs

    arms = study_recipes(STUDY)
    runs_dir, runs = study_runs(arms)
    assert runs_dir == Path("runs/study")
    recipes = {p.stem: load_recipe(p) for p in arms}
    tokens = {}
    for stem, r in recipes.items():
        assert (r.student.preset, r.data.seq_len, r.data.max_train_tokens, r.data.split_seed) == ("demo", 128, 620000, 0)
        assert r.teacher_cache.dir == "runs/study/_teacher_cache" and r.evaluate.teacher and r.evaluate.energy
        rows = r.distill.train.steps * r.distill.train.batch_size
        if r.align.enabled:
            rows += r.align.train.steps * r.align.train.batch_size
        tokens[stem] = rows * r.data.seq_len
    full = tokens["b_snn_ce"]
    assert full >= 4 * 144 * 8 * 128
    # a fraction of a pass over the training split: 620k tokens / 128 - 2% held out = 4,746 rows
    assert full // 128 <= 4746
    for series in ("b_snn_ce", "f_inherit_kd"):
        assert tokens.pop(f"{series}_quarter") == full // 4 and tokens.pop(f"{series}_half") == full // 2
    assert set(tokens.values()) == {full}
    seeds = {}
    for _, run, _ in runs:
        seeds.setdefault(run.arm, []).append(run.seed)
    assert seeds.pop("a_ann_ce") == [0] and all(s == [0, 1, 2] for s in seeds.values())
    # seed-major order: every arm's first seed runs before any arm's second, so a study cut short stays balanced
    order = [run.seed for _, run, _ in runs]
    assert order == sorted(order)
    r = recipes
    assert r["a_ann_ce"].student.arch == "llama"
    assert r["b_snn_ce"].distill.weights.sta == 0 and not r["b_snn_ce"].align.enabled
    assert not r["b_snn_ce"].student.init_from_teacher and not r["b_snn_ce"].teacher_cache.enabled
    assert r["c_snn_kd"].distill.weights.sta > 0 and not r["c_snn_kd"].align.enabled
    assert r["d_snn_spad"].align.enabled and r["d_snn_spad"].distill.weights.sta > 0
    # joint SpAD: the five terms at BiSpikCLM's weights throughout distill, no align stage, STA from the cache
    joint = r["g_snn_spad_joint"]
    assert vars(joint.distill.weights) == {"ea": 0.2, "saa": 0.1, "sfa": 0.1, "sta": 0.3, "hta": 0.3}
    assert not joint.align.enabled and joint.teacher_cache.enabled and joint.distill.use_teacher_cache
    assert r["e_inherit_ce"].student.init_from_teacher and r["e_inherit_ce"].distill.weights.sta == 0
    assert r["f_inherit_kd"].student.init_from_teacher and r["f_inherit_kd"].distill.weights.sta > 0
    assert all(x.student.config == {} for x in r.values())


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
        assert set(rec) == {"arm", "kind", "budget", "seed", "train_tokens", "bpb_persuasion", "bpb_hamlet",
                            "train_tokens_per_s"}
        assert rec["train_tokens"] == students[run]["train"]["tokens"]
        assert rec["bpb_persuasion"] == students[run]["bits_per_byte"]["persuasion"] and rec["bpb_hamlet"] > 0
    study_md = (report / "study.md").read_text()
    assert "| c_kd | snn_distill | 1.00 | 0,1 |" in study_md and "Goals" in study_md
    # energy-only reference rows: the teacher once, the student's quantised matched ANN (int8, ternary)
    assert study_md.count("(teacher) |") == 1 and study_md.count("(quantised ANN) |") == 2
    for name in ("leaderboard.md", "bpb_vs_energy.png", "learning_curves.png", "token_efficiency.png"):
        assert (report / name).stat().st_size > 0
    assert not (report / "task_accuracy.png").exists()  # no run scored a task: no empty chart

    done = {r: (runs / r / "distill" / "done.json").stat().st_mtime_ns for r in students}
    assert main(["study", str(folder), "--out", str(report)]) == 0  # resumable: all skipped
    assert {r: (runs / r / "distill" / "done.json").stat().st_mtime_ns for r in students} == done


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


def _record(arm, seed, kind, tokens, pers, ham=3.0, series="s"):
    return {"arm": arm, "run": f"{arm}-s{seed}", "kind": kind, "seed": seed, "train_tokens": tokens,
            "bpb_persuasion": pers, "bpb_hamlet": ham, "train_tokens_per_s": 100.0, "energy_pj": 2e6,
            "memory_inclusive_pj": 5e6,
            "mean_firing_rate": 0.2, "curve": [[tokens, pers]], "series": series, "budget": None}


def test_study_statistics_and_goals_from_hand_computed_values():
    from eval.study_report import arm_stats, goals, goals_markdown

    records = [_record("ce", s, "snn_ce", 1000, v, series="ce") for s, v in enumerate([2.40, 2.42, 2.44])]
    records += [_record("kd", s, "snn_distill", 1000, v, series="kd") for s, v in enumerate([2.30, 2.31, 2.32])]
    records += [_record("kd_q", s, "snn_distill", 250, v, series="kd") for s, v in enumerate([2.45, 2.46, 2.47])]
    for r in records:
        r["budget"] = r["train_tokens"] / 1000
    stats = {s["arm"]: s for s in arm_stats(records)}
    assert stats["ce"]["bpb_persuasion"] == pytest.approx(2.42)
    assert stats["ce"]["bpb_persuasion_std"] == pytest.approx(0.02)  # sample std of 2.40, 2.42, 2.44
    assert stats["kd"]["bpb_persuasion_std"] == pytest.approx(0.01)
    a = goals(list(stats.values()))
    noise = ((0.02**2 + 0.01**2) / 2) ** 0.5
    assert a["best_arm"] == "kd" and a["gain"] == pytest.approx(0.11) and a["noise_std"] == pytest.approx(noise)
    assert a["i"] is True and a["gain_in_sigmas"] == pytest.approx(0.11 / noise)
    assert a["quarter_arm"] == "kd_q" and a["ii"] is False  # 2.46 at 1/4 vs CE's 2.42 at the full budget
    assert "(i)" in goals_markdown(a) and "not met" in goals_markdown(a)
    from eval.study_report import study_markdown

    # 2e6 pJ = 2.00 µJ, 5e6 pJ = 5.00 µJ, 2.42 ± 0.02 over seeds 0,1,2
    teacher = {"label": "T", "role": "teacher", "bits_per_byte": {"persuasion": 1.2, "hamlet": 1.5},
               "energy_pj": 6.6e8, "memory_inclusive_pj": 9e10}
    table = study_markdown(list(stats.values()), a, [teacher], "window 512")
    assert ("| ce | snn_ce | 1.00 | 0,1,2 | 1,000 | 2.420 ± 0.020 | 3.000 ± 0.000 | 100 ± 0 | 2.00 ± 0.00 | "
            "5.00 ± 0.00 | 0.200 ± 0.000 |") in table
    assert "| T (teacher) | | | | | 1.200 | 1.500 | | 660.00 | 90,000.00 | |" in table and "(window 512)" in table
    # a better distillation arm without a 1/4-budget series: (ii) falls back to the best arm that has one
    extra = [_record("inh", s, "snn_distill", 1000, v, series="inh") for s, v in enumerate([2.20, 2.21, 2.22])]
    for r in extra:
        r["budget"] = 1.0
    b = goals(arm_stats(records + extra))
    assert b["best_arm"] == "inh" and b["quarter_arm"] == "kd_q" and b["quarter_of_best"] is False
    assert "inh has no 1/4-budget run" in goals_markdown(b)
    # a gain inside the noise is not met; one seed per arm cannot answer (i)
    for r in records:
        if r["arm"] == "kd":
            r["bpb_persuasion"] += 0.09
    assert goals(arm_stats(records))["i"] is False
    single = [r for r in records if r["seed"] == 0]
    one = goals(arm_stats(single))
    assert one["i"] is None and one["noise_std"] is None and one["ii"] is not None
    assert "(i)" in goals_markdown(one) and "not answered" in goals_markdown(one) and "(ii)" in goals_markdown(one)


def test_run_kind_from_the_resolved_config():
    from eval.study_report import run_kind

    ce = {"student": {"arch": "spikegpt"}, "align": {"enabled": False}, "distill": {"weights": {"sta": 0.0}}}
    assert run_kind(ce) == "snn_ce"
    assert run_kind({**ce, "student": {"arch": "llama"}}) == "ann_ce"
    assert run_kind({**ce, "distill": {"weights": {"sta": 0.3, "hta": 0.3}}}) == "snn_distill"
    assert run_kind({**ce, "align": {"enabled": True}}) == "snn_distill"
    assert run_kind({**ce, "student": {"arch": "spikegpt", "init_from_teacher": True}}) == "snn_distill"
