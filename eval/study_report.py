"""The report of a seeded study (`spikedistill study`): one record per run, mean +- std per arm, the goals of
the study answered from the records, and learning-curve and token-efficiency plots with error bands.

Inputs are leaderboard rows (eval.leaderboard.build_leaderboard: student rows carry `train`, the run's
training tokens, tokens/s, bytes/s, final validation bits/byte and validation curve) and, per run, its arm and
seed as the study driver ran it, with the run's resolved config.yaml (learning rate, vocabulary, what it takes
from the teacher).

Record (docs/results/summary.json, one per run; None where a run lacks the figure):
    arm, run, seed, series (eval.leaderboard.series_key: runs that differ only in budget and seed share it)
    kind      "ann_ce" | "ann_kd" | "snn_ce" | "snn_distill" (`run_kind`)
    role      what the arm is, from its config and name (`arm_role`): "ce", "logit_kd", "inherit_ce",
              "inherit_kd", "spad_align", "spad_joint", "other_distill", "ann_ce", "ann_kd"
    vocab     student.vocab: "teacher" (default) | "subset:N" | "bytes"; walltime: the arm's name contains
              "walltime" (sized by training time, not bytes)
    lr        distill.train.optim.lr of the resolved config (what the run trained with)
    train_tokens (next-token targets, align + distill, all ranks), train_bytes (train_tokens / the training
              data's tokens per byte), budget (train_bytes over the largest of the runs not sized by time)
    val_bpb   the distill stage's final validation bits/byte
    bpb_<text>, bpb_<text>_ci95 ([low, high], the run's 95% bootstrap interval, eval/bpb.py), <text> in TEXTS:
              the held-out texts under the shared windows protocol (the teacher's protocol too)
    vocab_size, tokens_per_byte (the held-out texts under the run's own tokenizer, pooled),
    train_tokens_per_byte (its training data), train_tokens_per_s, train_bytes_per_s, train_seconds
    energy_pj, memory_inclusive_pj (per token), compute_pj_per_byte, memory_pj_per_byte (x tokens_per_byte),
    ternary_compute_pj_per_byte, ternary_memory_pj_per_byte (the run's bit-matched ternary ANN: same
              vocabulary, so the same tokens per byte), mean_firing_rate
    params, params_embedding, params_head, params_body (eval.leaderboard.param_split)
    code_commit, code_dirty: the git commit of the code that trained the run and whether its tracked files
              differed from it (the distill stage's done.json "code", pipeline/provenance.py; None for runs
              trained before it was recorded): a study run over several sessions says which code each number
              came from
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

TEXTS = ("persuasion", "hamlet")
SIGMAS = 3.0  # goals (i), (iii), (a): a gain must exceed this many standard deviations of seed noise
ANN_MARGIN = 0.05  # goal (iv): bits/byte
ENERGY_FRACTION = Fraction(1, 3)  # goal (c)
BUDGET_TOLERANCE = 0.1  # a budget within 10% of 1 (or of 1/4) counts as the full (or the quarter) budget

GOALS_TEXT = f"""\
Every goal is answered from `summary.json` by `eval.study_report.goals`, on held-out bits/byte (lower is
better). sigma = the pooled seed standard deviation of the two arms compared (root mean square of their
sample stds); a gain "by > {SIGMAS:.0f} sigma" needs at least two seeds in each arm. Seed noise understates
run-to-run noise, so every comparison also states the bootstrap check: the gain against the root sum of
squares of the two arms' mean 95% half-widths (the text-sampling noise of a score). An arm that is missing
leaves its goal *not answered*. "Full budget" = the study's largest training text in bytes (within
{BUDGET_TOLERANCE:.0%}); arms whose name contains `walltime` are sized by training time instead.

Distillation (issue 21), among the SNN arms with the teacher's vocabulary at the full budget:
- **(i)** The best distillation arm (lowest mean over the two texts among the arms that take anything from
  the teacher) beats CE-only by > {SIGMAS:.0f} sigma on Persuasion AND on Hamlet, at equal tokens, each at
  its tuned learning rate.
- **(ii)** At 1/4 of the tokens, that arm (or, without a 1/4 run, the best-ranked distillation arm that has
  one) matches or beats CE-only at the full budget (mean bits/byte no higher) on both texts.
- **(iii)** Joint SpAD (the arm whose name contains `spad_joint`) beats logit KD alone (KD + CE, nothing
  else from the teacher) by > {SIGMAS:.0f} sigma on both texts.
- **(iv)** The best distilled spiking student is within {ANN_MARGIN} bits/byte of the distilled matched
  Llama (kind `ann_kd`) on both texts (no worse than its mean + {ANN_MARGIN}).

Own vocabulary (issue 20):
- **(a)** For every student vocabulary other than the teacher's, KD with weight inheritance beats CE-only
  (same vocabulary, full budget) by > {SIGMAS:.0f} sigma on Persuasion.
- **(b)** At equal training wall time, the best own-vocabulary student (the best `walltime` arm) beats the
  best student with the teacher's vocabulary at the full budget on both texts (lower mean).
- **(c)** Its energy per byte is at most {ENERGY_FRACTION} of the inheritance + KD arm's with the
  teacher's vocabulary, compute-only and memory-inclusive, and below its own bit-matched ternary ANN's per
  byte (same vocabulary), both figures. Without a `walltime` arm, (c) and (d) take the best own-vocabulary
  arm at the full budget.
- **(d)** More than half of its parameters are in the spiking body (not the embedding or the LM head).
"""

HELDOUT_TEXT = """\
The held-out texts are Jane Austen's *Persuasion* and Shakespeare's *Hamlet*, bundled with the teacher
package as separate files (teachers/corpus/PROVENANCE.md). The student never sees them: the prepare stage
reads only the training sources, and the evaluate stage scores the first `evaluate.max_text_bytes` of each
(cut at a line end). The teacher, SmolLM2, was pretrained on web-scale public text and has probably seen
both: they are famous public-domain books copied widely online. So the teacher's scores on them are not
held-out scores for the teacher, and a student distilled from it may inherit some of what it memorised;
a distillation gain on these texts can include that."""


@dataclass(frozen=True)
class StudyRun:
    """One run of a study: its run directory name, arm (the recipe's stem) and seed (None: the recipe's own)."""

    run: str
    arm: str
    seed: int | None


# ---------------------------------------------------------------- what an arm is, from its config and name


def _weights(config: dict) -> dict:
    return ((config.get("distill") or {}).get("weights") or {})


def _on(weights: dict, *names: str) -> bool:
    return any(float(weights.get(k) or 0) > 0 for k in names)


def uses_teacher(config: dict) -> bool:
    """True when a run's resolved config takes anything from the teacher: align, a KD or feature term in
    distill, or weights inherited from the teacher."""
    student = config.get("student") or {}
    return bool((config.get("align") or {}).get("enabled")) or _on(_weights(config), "ea", "saa", "sfa", "sta") \
        or bool(student.get("init_from_teacher"))


def run_kind(config: dict) -> str:
    """"ann_ce" / "snn_ce" (student.arch llama / spikegpt, nothing from the teacher), "ann_kd" (the matched
    Llama learning from the teacher) or "snn_distill"."""
    arch = "ann" if (config.get("student") or {}).get("arch") == "llama" else "snn"
    if not uses_teacher(config):
        return f"{arch}_ce"
    return "ann_kd" if arch == "ann" else "snn_distill"


def student_vocab(config: dict) -> str:
    """The run's student.vocab: "teacher" (the default, also for configs written before the key) | "subset:N" |
    "bytes"."""
    return str((config.get("student") or {}).get("vocab") or "teacher")


def arm_role(config: dict, arm: str) -> str:
    """What an arm is, for the goals: "ann_ce" / "ann_kd" (run_kind); "spad_joint" (the name contains
    `spad_joint`); "ce" (nothing from the teacher); "spad_align" (an align stage); "other_distill" (feature
    terms in distill, or nothing the other roles name); else by KD (distill.weights.sta > 0) and inheritance
    (student.init_from_teacher): "inherit_kd", "logit_kd", "inherit_ce"."""
    kind = run_kind(config)
    if kind.startswith("ann"):
        return kind
    if "spad_joint" in arm:
        return "spad_joint"
    if kind == "snn_ce":
        return "ce"
    if (config.get("align") or {}).get("enabled"):
        return "spad_align"
    weights, inherit = _weights(config), bool((config.get("student") or {}).get("init_from_teacher"))
    if _on(weights, "ea", "saa", "sfa"):
        return "other_distill"
    if _on(weights, "sta"):
        return "inherit_kd" if inherit else "logit_kd"
    return "inherit_ce" if inherit else "other_distill"


def _run_config(runs_dir: Path, run: str) -> dict:
    import yaml

    try:
        return yaml.safe_load((runs_dir / run / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def _lr(config: dict) -> float | None:
    lr = (((config.get("distill") or {}).get("train") or {}).get("optim") or {}).get("lr")
    try:
        return None if lr is None else float(lr)
    except (TypeError, ValueError):
        return None


# ---------------------------------------------------------------- records


def _times(value: float | None, factor: float | None) -> float | None:
    return None if value is None or factor is None else value * factor


def _ci(row: dict, text: str) -> list[float] | None:
    interval = (row.get("bpb_interval") or {}).get(text)
    return None if not interval else [interval["low"], interval["high"]]


def _record(sr: StudyRun, row: dict, config: dict) -> dict:
    """One summary record (see the module docstring) from a student leaderboard row and the run's config."""
    train = row.get("train") or {}
    tokens, train_tpb, tpb = train.get("tokens"), train.get("tokens_per_byte"), row.get("tokens_per_byte")
    ternary = (row.get("quantised_pj") or {}).get("ternary") or {}
    return {
        "arm": sr.arm, "run": sr.run, "seed": sr.seed, "series": train.get("series") or sr.arm,
        "kind": run_kind(config), "role": arm_role(config, sr.arm), "vocab": student_vocab(config),
        "walltime": "walltime" in sr.arm, "lr": _lr(config),
        "train_tokens": tokens, "train_bytes": tokens / train_tpb if tokens and train_tpb else None, "budget": None,
        "val_bpb": train.get("val_bpb"),
        **{f"bpb_{t}": row["bits_per_byte"].get(t) for t in TEXTS},
        **{f"bpb_{t}_ci95": _ci(row, t) for t in TEXTS},
        "vocab_size": row.get("vocab_size"), "tokens_per_byte": tpb, "train_tokens_per_byte": train_tpb,
        "train_tokens_per_s": train.get("tokens_per_s"), "train_bytes_per_s": train.get("bytes_per_s"),
        "train_seconds": train.get("train_seconds"),
        "energy_pj": row.get("energy_pj"), "memory_inclusive_pj": row.get("memory_inclusive_pj"),
        "compute_pj_per_byte": row.get("compute_pj_per_byte"), "memory_pj_per_byte": row.get("memory_pj_per_byte"),
        "ternary_compute_pj_per_byte": _times(ternary.get("compute_pj"), tpb),
        "ternary_memory_pj_per_byte": _times(ternary.get("memory_inclusive_pj"), tpb),
        "mean_firing_rate": row.get("mean_firing_rate"),
        **{k: row.get(k) for k in ("params", "params_embedding", "params_head", "params_body")},
        "curve": train.get("curve") or [],
    }


def _set_budgets(records: list[dict]) -> None:
    """budget = training bytes (tokens when a run lacks its bytes) over the largest among the runs not sized
    by wall time."""
    key = "train_bytes" if all(r["train_bytes"] for r in records) else "train_tokens"
    sized = [r[key] or 0 for r in records if not r["walltime"]] or [r[key] or 0 for r in records]
    full = max(sized, default=0)
    for r in records:
        r["budget"] = round(r[key] / full, 4) if full and r[key] else None


def summary_records(rows: list[dict], runs: list[StudyRun], runs_dir: str | Path) -> list[dict]:
    """One record per study run that has a student row (see the module docstring), by arm and seed."""
    by_run = {r["run"]: r for r in rows if r["role"] == "student"}
    records = [_record(sr, by_run[sr.run], _run_config(Path(runs_dir), sr.run))
               for sr in sorted(runs, key=lambda r: (r.arm, -1 if r.seed is None else r.seed)) if sr.run in by_run]
    for r in records:
        code = _run_code(Path(runs_dir), r["run"])
        r["code_commit"], r["code_dirty"] = code.get("commit"), code.get("dirty")
    _set_budgets(records)
    return records


def _run_code(runs_dir: Path, run: str) -> dict:
    """The distill stage's done.json "code" record ({} when absent: trained before it was recorded)."""
    try:
        return json.loads((runs_dir / run / "distill" / "done.json").read_text()).get("code") or {}
    except (OSError, ValueError):
        return {}


def code_markdown(records: list[dict]) -> str:
    """One line: how many runs each code commit trained (short hashes; "+ local changes" when dirty)."""
    counts: dict[str, int] = {}
    for r in records:
        commit = r.get("code_commit")
        name = "not recorded" if not commit else commit[:10] + (" + local changes" if r.get("code_dirty") else "")
        counts[name] = counts.get(name, 0) + 1
    parts = [f"{name} ({n} run{'s' if n != 1 else ''})" for name, n in sorted(counts.items())]
    return "Code that trained the runs (git commit, from each run's distill/done.json): " + ", ".join(parts) + "."


SUMMARY_KEYS = (
    "arm", "run", "seed", "series", "kind", "role", "vocab", "walltime", "lr", "budget", "train_tokens",
    "train_bytes", "val_bpb", *(f"bpb_{t}{s}" for t in TEXTS for s in ("", "_ci95")), "vocab_size",
    "tokens_per_byte", "train_tokens_per_byte", "train_tokens_per_s", "train_bytes_per_s", "train_seconds",
    "energy_pj", "memory_inclusive_pj", "compute_pj_per_byte", "memory_pj_per_byte", "ternary_compute_pj_per_byte",
    "ternary_memory_pj_per_byte", "mean_firing_rate", "params", "params_embedding", "params_head", "params_body",
    "code_commit", "code_dirty",
)
NUMERIC = (
    "lr", "budget", "train_tokens", "train_bytes", "val_bpb", *(f"bpb_{t}" for t in TEXTS), "vocab_size",
    "tokens_per_byte", "train_tokens_per_byte", "train_tokens_per_s", "train_bytes_per_s", "train_seconds",
    "energy_pj", "memory_inclusive_pj", "compute_pj_per_byte", "memory_pj_per_byte", "ternary_compute_pj_per_byte",
    "ternary_memory_pj_per_byte", "mean_firing_rate", "params", "params_embedding", "params_head", "params_body",
)


# ---------------------------------------------------------------- per-arm statistics


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def arm_stats(records: list[dict]) -> list[dict]:
    """Per arm (in first-seen order): kind, role, vocab, walltime, series, seeds, mean/std of every numeric
    field, `bpb_<text>_hw` (the mean over its runs of their 95% bootstrap half-widths) and `bpb_mean` (the
    mean over the texts, per run, then over runs)."""
    arms: dict[str, list[dict]] = {}
    for r in records:
        arms.setdefault(r["arm"], []).append(r)
    out = []
    for arm, members in arms.items():
        first = members[0]
        stat = {"arm": arm, **{k: first[k] for k in ("kind", "role", "vocab", "walltime", "series")},
                "seeds": [m["seed"] for m in members], "n": len(members)}
        for key in NUMERIC:
            stat[key], stat[f"{key}_std"] = _mean_std([m.get(key) for m in members])
        for t in TEXTS:
            stat[f"bpb_{t}_hw"] = _mean_std([(ci[1] - ci[0]) / 2 for m in members if (ci := m.get(f"bpb_{t}_ci95"))])[0]
        stat["bpb_mean"], stat["bpb_mean_std"] = _mean_std(
            [statistics.fmean([m[f"bpb_{t}"] for t in TEXTS]) for m in members
             if all(m[f"bpb_{t}"] is not None for t in TEXTS)])
        out.append(stat)
    return out


# ---------------------------------------------------------------- goals


def _pooled_std(*stds: float | None) -> float | None:
    """Root mean square of the arms' seed standard deviations (None unless every arm has one)."""
    if not stds or any(s is None for s in stds):
        return None
    return math.sqrt(sum(s * s for s in stds) / len(stds))


def _rss(*values: float | None) -> float | None:
    return None if any(v is None for v in values) else math.sqrt(sum(v * v for v in values))


def _all(values: list[bool | None]) -> bool | None:
    """False when any is False; else None when any is None (or there are none); else True."""
    if any(v is False for v in values):
        return False
    return None if not values or any(v is None for v in values) else True


def _at(s: dict, budget: float) -> bool:
    """The arm is at this fraction of the full budget (within BUDGET_TOLERANCE) and sized by bytes."""
    return s["budget"] is not None and abs(s["budget"] / budget - 1) <= BUDGET_TOLERANCE and not s["walltime"]


def _best(stats: list[dict]) -> dict | None:
    """The arm with the lowest mean bits/byte over the texts (the first on a tie), or None."""
    scored = [s for s in stats if s["bpb_mean"] is not None]
    return min(scored, key=lambda s: s["bpb_mean"]) if scored else None


def _first(stats: list[dict], **traits) -> dict | None:
    """The best arm (see _best) whose fields equal `traits`."""
    return _best([s for s in stats if all(s[k] == v for k, v in traits.items())])


def compare(arm: dict | None, baseline: dict | None, text: str) -> dict | None:
    """`arm` against `baseline` on one text: gain = baseline - arm bits/byte (positive: arm is better), the
    pooled seed std (`_pooled_std`) and the gain in those sigmas, `beats_sigmas` (gain > SIGMAS sigma; None
    with < 2 seeds in an arm), and the bootstrap check: `ci_half_width` = root sum of squares of the two arms'
    mean 95% half-widths, `beyond_ci` = gain > it. None when either arm or score is missing."""
    key = f"bpb_{text}"
    if arm is None or baseline is None or arm[key] is None or baseline[key] is None:
        return None
    gain = baseline[key] - arm[key]
    noise = _pooled_std(arm[f"{key}_std"], baseline[f"{key}_std"])
    half = _rss(arm.get(f"{key}_hw"), baseline.get(f"{key}_hw"))
    return {"text": text, "arm": arm["arm"], "baseline": baseline["arm"], "value": arm[key],
            "baseline_value": baseline[key], "gain": gain, "noise_std": noise,
            "gain_in_sigmas": gain / noise if noise else None,
            "beats_sigmas": None if noise is None else gain > SIGMAS * noise,
            "ci_half_width": half, "beyond_ci": None if half is None else gain > half}


def _comparisons(arm, baseline, texts=TEXTS) -> list[dict]:
    return [c for t in texts if (c := compare(arm, baseline, t)) is not None]


def _beats(arm, baseline, texts=TEXTS) -> tuple[bool | None, list[dict]]:
    """(arm beats baseline by > SIGMAS sigma on every text, the comparisons); None when an arm is missing."""
    cmps = _comparisons(arm, baseline, texts)
    return (_all([c["beats_sigmas"] for c in cmps]) if len(cmps) == len(texts) else None), cmps


def goal_i(pool: list[dict]) -> dict:
    """(i): the best distillation arm against CE-only (pool: SNN arms, teacher vocabulary, full budget)."""
    ce = _first(pool, role="ce")
    best = _best([s for s in pool if s["kind"] == "snn_distill"])
    met, cmps = _beats(best, ce)
    return {"met": met, "arm": best and best["arm"], "baseline": ce and ce["arm"], "comparisons": cmps}


def goal_ii(stats: list[dict], pool: list[dict], best: str | None, ce: str | None) -> dict:
    """(ii): the 1/4-budget run of the best distillation arm's series (else of the best-ranked distillation arm
    that has one) against CE-only at the full budget: mean no higher, on each text."""
    by_arm = {s["arm"]: s for s in stats}
    ranked = sorted((s for s in pool if s["kind"] == "snn_distill" and s["bpb_mean"] is not None),
                    key=lambda s: s["bpb_mean"])
    quarters = [s for s in stats if _at(s, 0.25) and s["vocab"] == "teacher" and s["kind"] == "snn_distill"]
    q = next((q for arm in ranked for q in quarters if q["series"] == arm["series"]), None)
    base = by_arm.get(ce)
    cmps = _comparisons(q, base)
    met = _all([c["gain"] >= 0 for c in cmps]) if q and base and len(cmps) == len(TEXTS) else None
    return {"met": met, "arm": q and q["arm"], "baseline": ce, "comparisons": cmps,
            "of_best": bool(q and best in by_arm and q["series"] == by_arm[best]["series"])}


def goal_iii(pool: list[dict]) -> dict:
    """(iii): joint SpAD against logit KD alone, by > SIGMAS sigma on both texts."""
    joint, kd = _first(pool, role="spad_joint"), _first(pool, role="logit_kd")
    met, cmps = _beats(joint, kd)
    return {"met": met, "arm": joint and joint["arm"], "baseline": kd and kd["arm"], "comparisons": cmps}


def goal_iv(pool: list[dict], best: dict | None) -> dict:
    """(iv): the best distilled spiking student no worse than the distilled matched Llama + ANN_MARGIN."""
    ann = _first(pool, kind="ann_kd")
    cmps = _comparisons(best, ann)
    met = _all([-c["gain"] <= ANN_MARGIN for c in cmps]) if len(cmps) == len(TEXTS) else None
    return {"met": met, "arm": best and best["arm"], "baseline": ann and ann["arm"], "comparisons": cmps}


def goal_a(stats: list[dict]) -> dict:
    """(a): per own vocabulary, inheritance + KD against CE-only on Persuasion, by > SIGMAS sigma."""
    full = [s for s in stats if _at(s, 1.0) and s["kind"].startswith("snn")]
    vocabs = sorted({s["vocab"] for s in full if s["vocab"] != "teacher"})
    per_vocab = {}
    for v in vocabs:
        kd, ce = _first(full, vocab=v, role="inherit_kd"), _first(full, vocab=v, role="ce")
        met, cmps = _beats(kd, ce, ("persuasion",))
        per_vocab[v] = {"met": met, "arm": kd and kd["arm"], "baseline": ce and ce["arm"], "comparisons": cmps}
    return {"met": _all([p["met"] for p in per_vocab.values()]), "vocabs": per_vocab}


def goal_b(stats: list[dict], pool: list[dict]) -> dict:
    """(b): the best `walltime` arm against the best teacher-vocabulary student at the full budget."""
    own = _best([s for s in stats if s["walltime"] and s["kind"].startswith("snn")])
    ref = _best([s for s in pool if s["kind"].startswith("snn")])
    cmps = _comparisons(own, ref)
    met = _all([c["gain"] > 0 for c in cmps]) if own and ref and len(cmps) == len(TEXTS) else None
    return {"met": met, "arm": own and own["arm"], "baseline": ref and ref["arm"], "comparisons": cmps,
            "train_seconds": [own and own["train_seconds"], ref and ref["train_seconds"]]}


def _own_student(stats: list[dict], walltime_arm: str | None) -> dict | None:
    """The student of goals (c) and (d): the best `walltime` arm, else the best own-vocabulary SNN arm at the
    full budget."""
    if walltime_arm:
        return next(s for s in stats if s["arm"] == walltime_arm)
    return _best([s for s in stats if _at(s, 1.0) and s["vocab"] != "teacher" and s["kind"].startswith("snn")])


def goal_c(own: dict | None, pool: list[dict]) -> dict:
    """(c): per byte, compute-only and memory-inclusive: own <= ENERGY_FRACTION x the teacher-vocabulary
    inheritance + KD arm, and own < its bit-matched ternary ANN."""
    ref = _first(pool, role="inherit_kd")
    checks = {}
    for fig in ("compute", "memory"):
        key = f"{fig}_pj_per_byte"
        mine, theirs = own and own.get(key), ref and ref.get(key)
        ternary = own and own.get(f"ternary_{key}")
        checks[f"{fig}_vs_reference"] = None if mine is None or theirs is None else mine <= ENERGY_FRACTION * theirs
        checks[f"{fig}_vs_ternary"] = None if mine is None or ternary is None else mine < ternary
    return {"met": _all(list(checks.values())), "arm": own and own["arm"], "baseline": ref and ref["arm"],
            "checks": checks, "own": own, "reference": ref}


def goal_d(own: dict | None) -> dict:
    """(d): more than half of the student's parameters in its spiking body."""
    if own is None or not own.get("params") or own.get("params_body") is None:
        return {"met": None, "arm": own and own["arm"]}
    share = own["params_body"] / own["params"]
    return {"met": share > 0.5, "arm": own["arm"], "body_share": share,
            **{k: own[k] for k in ("params", "params_embedding", "params_head", "params_body")}}


def goals(stats: list[dict]) -> dict:
    """Every goal of GOALS_TEXT answered from per-arm statistics: {"i", "ii", "iii", "iv", "a", "b", "c", "d"},
    each a dict with "met" (True, False, or None = not answered: an arm or a figure is missing) and the arms
    and numbers that decide it."""
    pool = [s for s in stats if _at(s, 1.0) and s["vocab"] == "teacher"]
    i = goal_i(pool)
    best = next((s for s in stats if s["arm"] == i["arm"]), None)
    b = goal_b(stats, pool)
    own = _own_student(stats, b["arm"])
    return {"i": i, "ii": goal_ii(stats, pool, i["arm"], i["baseline"]), "iii": goal_iii(pool),
            "iv": goal_iv(pool, best), "a": goal_a(stats), "b": b, "c": goal_c(own, pool), "d": goal_d(own)}


# ---------------------------------------------------------------- goals in words


def _verdict(met: bool | None) -> str:
    return "**not answered**" if met is None else ("**met**" if met else "**not met**")


def _cmp_words(c: dict, sigmas: bool = True) -> str:
    """One comparison in words: both means, the gain, its sigmas and the bootstrap check."""
    text = f"{c['text'].capitalize()} {c['value']:.3f} vs {c['baseline_value']:.3f}, gain {c['gain']:+.3f}"
    if sigmas:
        if c["noise_std"] is None:
            text += " (seed noise unknown: an arm has one seed)"
        else:
            sig = "" if c["gain_in_sigmas"] is None else f" = {c['gain_in_sigmas']:.1f} sigma"
            text += f"{sig} (pooled seed std {c['noise_std']:.3f})"
    if c["ci_half_width"] is not None:
        text += f", bootstrap: {'beyond' if c['beyond_ci'] else 'within'} ±{c['ci_half_width']:.3f}"
    return text


def _pair_line(label: str, g: dict, arm_what: str, base_what: str, rule: str, sigmas: bool = True) -> str:
    """A goal that compares one arm with a baseline arm, in one line."""
    if g["arm"] is None or g["baseline"] is None:
        missing = " and ".join(w for w, x in ((arm_what, g["arm"]), (base_what, g["baseline"])) if x is None)
        return f"- ({label}) {_verdict(None)}: no {missing} in this study."
    words = "; ".join(_cmp_words(c, sigmas) for c in g["comparisons"]) or "no scores"
    return f"- ({label}) {_verdict(g['met'])}: {arm_what} {g['arm']} vs {base_what} {g['baseline']}: {words} ({rule})."


def _uj(pj: float | None) -> str:
    return "?" if pj is None else f"{pj / 1e6:,.3f} µJ"


def _energy_line(g: dict) -> str:
    """Goal (c) in one line: per-byte energies and the four checks."""
    own, ref, checks = g["own"], g["reference"], g["checks"]
    if own is None or ref is None:
        named = (("own-vocabulary student", own), ("teacher-vocabulary inheritance + KD arm", ref))
        missing = " and ".join(w for w, x in named if x is None)
        return f"- (c) {_verdict(None)}: no {missing} in this study."
    parts = []
    for fig, name in (("compute", "compute-only"), ("memory", "memory-inclusive")):
        key = f"{fig}_pj_per_byte"
        ratio = "" if not own.get(key) or not ref.get(key) else f" = {own[key] / ref[key]:.2f}x"
        parts.append(f"{name} {_uj(own.get(key))}/byte vs {_uj(ref.get(key))}{ratio} (needs <= "
                     f"{ENERGY_FRACTION}), vs its ternary ANN {_uj(own.get('ternary_' + key))}")
    failed = [k for k, v in checks.items() if v is False]
    return (f"- (c) {_verdict(g['met'])}: {own['arm']} against {ref['arm']}: " + "; ".join(parts)
            + (f" (failed: {', '.join(failed)})" if failed else "") + ".")


def goals_markdown(a: dict) -> str:
    """The answers to every goal in words, with the numbers that decide them (see GOALS_TEXT)."""
    lines = ["Goals, answered (each as stated before the runs):"]
    sig = f"needs > {SIGMAS:.0f} sigma on each"
    lines.append(_pair_line("i", a["i"], "best distillation arm", "CE-only", sig))
    ii = a["ii"]
    note = "" if ii["of_best"] or ii["arm"] is None else f"; {a['i']['arm']} has no 1/4-budget run"
    lines.append(_pair_line("ii", ii, "1/4-budget arm", "CE-only at the full budget", "needs gain >= 0 on each"
                            + note, sigmas=False))
    lines.append(_pair_line("iii", a["iii"], "joint SpAD", "logit KD alone", sig))
    lines.append(_pair_line("iv", a["iv"], "best distilled spiking student", "distilled matched Llama",
                            f"needs gain >= -{ANN_MARGIN} on each", sigmas=False))
    if not a["a"]["vocabs"]:
        lines.append(f"- (a) {_verdict(None)}: no vocabulary arm (student.vocab other than teacher) in this study.")
    else:
        lines.append(f"- (a) {_verdict(a['a']['met'])}, per vocabulary:")
        lines += ["  " + _pair_line(v, g, "inheritance + KD", "CE-only", f"needs > {SIGMAS:.0f} sigma")
                  for v, g in a["a"]["vocabs"].items()]
    b = a["b"]
    seconds = ("" if None in b["train_seconds"] else
               f"; training-step time {b['train_seconds'][0]:,.0f} s vs {b['train_seconds'][1]:,.0f} s")
    lines.append(_pair_line("b", b, "best equal-wall-time arm", "best teacher-vocabulary student",
                            "needs gain > 0 on each" + seconds, sigmas=False))
    lines.append(_energy_line(a["c"]))
    d = a["d"]
    if d["met"] is None:
        lines.append(f"- (d) {_verdict(None)}: no own-vocabulary student with a parameter count in this study.")
    else:
        lines.append(f"- (d) {_verdict(d['met'])}: {d['arm']} has {d['params']:,.0f} parameters: embedding "
                     f"{d['params_embedding']:,.0f}, LM head {d['params_head']:,.0f}, body {d['params_body']:,.0f} "
                     f"({d['body_share']:.0%} in the body; needs > 50%).")
    return "\n".join(lines)


# ---------------------------------------------------------------- the table


def _pm(mean: float | None, std: float | None, fmt: str = "{:.3f}") -> str:
    if mean is None:
        return ""
    return fmt.format(mean) + ("" if std is None else " ± " + fmt.format(std))


def _bpb(mean: float | None, std: float | None, half_width: float | None) -> str:
    """'mean ± seed std [±mean bootstrap half-width]'."""
    return _pm(mean, std) + ("" if mean is None or half_width is None else f" [±{half_width:.3f}]")


def _scaled(s: dict, key: str, scale: float, fmt: str) -> str:
    mean, std = s.get(key), s.get(f"{key}_std")
    return _pm(None if mean is None else mean * scale, None if std is None else std * scale, fmt)


COLUMNS = ("arm", "kind", "vocab", "budget", "lr", "seeds", "train tokens", "val bpb", "bpb Persuasion",
           "bpb Hamlet", "tokens/byte", "train tok/s", "train bytes/s", "energy/token compute (µJ)",
           "memory-incl. (µJ)", "energy/byte compute (µJ)", "memory-incl./byte (µJ)", "firing rate")


def _arm_cells(s: dict) -> list[str]:
    seeds = ",".join("-" if x is None else str(x) for x in s["seeds"])
    return [s["arm"], s["kind"], s["vocab"], _pm(s["budget"], None, "{:.2f}"), _pm(s["lr"], None, "{:.3g}"), seeds,
            _pm(s["train_tokens"], None, "{:,.0f}"), _pm(s["val_bpb"], s["val_bpb_std"]),
            *(_bpb(s[f"bpb_{t}"], s[f"bpb_{t}_std"], s[f"bpb_{t}_hw"]) for t in TEXTS),
            _pm(s["tokens_per_byte"], None, "{:.4f}"), _scaled(s, "train_tokens_per_s", 1, "{:,.0f}"),
            _scaled(s, "train_bytes_per_s", 1, "{:,.0f}"), _scaled(s, "energy_pj", 1e-6, "{:,.2f}"),
            _scaled(s, "memory_inclusive_pj", 1e-6, "{:,.2f}"), _scaled(s, "compute_pj_per_byte", 1e-6, "{:,.3f}"),
            _scaled(s, "memory_pj_per_byte", 1e-6, "{:,.3f}"), _pm(s["mean_firing_rate"], s["mean_firing_rate_std"])]


def _reference_cells(r: dict) -> list[str]:
    """A teacher or quantised-ANN leaderboard row in the study's columns (energy and, for the teacher, bits/byte
    with its bootstrap half-width)."""
    bpb, intervals = r.get("bits_per_byte") or {}, r.get("bpb_interval") or {}
    cells = [f"{r['label']} ({r['role']})"] + [""] * 7
    cells += [_bpb(bpb.get(t), None, (intervals.get(t) or {}).get("half_width")) for t in TEXTS]
    cells += [_pm(r.get("tokens_per_byte"), None, "{:.4f}"), "", ""]
    cells += [_pm(None if r.get(k) is None else r[k] * 1e-6, None, fmt) for k, fmt in (
        ("energy_pj", "{:,.2f}"), ("memory_inclusive_pj", "{:,.2f}"), ("compute_pj_per_byte", "{:,.3f}"),
        ("memory_pj_per_byte", "{:,.3f}"))]
    return cells + [""]


def study_markdown(stats: list[dict], answer: dict, references: list[dict] | None = None,
                   protocol: str | None = None, text_bytes: dict | None = None) -> str:
    """The goals as stated (GOALS_TEXT), what the held-out texts are (HELDOUT_TEXT), the per-arm table (mean ±
    sample std over seeds, [± the mean 95% bootstrap half-width]) with energy-only reference rows (leaderboard
    rows of the teacher and the quantised matched ANN: `references`), and the goals answered, as markdown.
    text_bytes: {text: UTF-8 bytes scored}, named under the table."""
    lines = ["## Goals (stated before the runs)", "", GOALS_TEXT, "## Held-out texts", "", HELDOUT_TEXT, "",
             "## Results", "", "| " + " | ".join(COLUMNS) + " |", "|---|---|---|" + "---:|" * (len(COLUMNS) - 3)]
    lines += ["| " + " | ".join(_arm_cells(s)) + " |" for s in stats]
    lines += ["| " + " | ".join(_reference_cells(r)) + " |" for r in references or []]
    scored = ", ".join(f"{t.capitalize()} {n:,} bytes" for t, n in (text_bytes or {}).items() if n)
    lines += ["", (
        "mean ± sample standard deviation over the arm's seeds (no ± with one seed); in brackets, the mean over "
        "the arm's runs of each run's 95% bootstrap half-width (percentile bootstrap over blocks of the text, "
        "eval/bpb.py: the text-sampling noise of one score, which the seed std does not see). Bits/byte: the "
        "held-out texts" + (f" ({scored})" if scored else "") + ", student and teacher under one protocol"
        + (f" ({protocol})" if protocol else "") + ". val bpb: the distill stage's final validation bits/byte "
        "(more of the training distribution). lr: distill.train.optim.lr from each run's config.yaml. budget: "
        "training bytes over the largest of the study's runs sized by bytes. tokens/byte: the held-out texts "
        "under the run's own tokenizer; train bytes/s = train tok/s / the training data's tokens per byte. "
        "Energy per token from the measured firing rates (eval/README.md): compute only, and memory-inclusive "
        "(weights, activations and state moved per token); per byte = per token x tokens/byte (the quantised "
        "matched-ANN rows, energy only: their student's tokens/byte)."), "", "## Goals, answered", "",
        goals_markdown(answer)]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plots


def _series(records: list[dict]) -> dict[str, list[dict]]:
    """Budget series (runs that differ only in budget and seed, eval.leaderboard.series_key), each named by
    its largest-budget arm."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["series"], []).append(r)
    return {max(ms, key=lambda m: m["train_tokens"] or 0)["arm"]: ms for ms in groups.values()}


def _in_bytes(records: list[dict]) -> bool:
    """Plot against training bytes when every run knows its training data's tokens per byte."""
    return bool(records) and all(r.get("train_tokens_per_byte") for r in records)


def plot_learning_bands(records: list[dict], path) -> None:
    """Validation bits/byte against training bytes (tokens when a run lacks its tokens per byte): per arm the
    mean over seeds, shaded +- one std."""
    from eval.leaderboard import _axes, _save

    fig, ax = _axes((8, 5))
    in_bytes = _in_bytes(records)
    arms: dict[str, list[dict]] = {}
    for r in records:
        if r["curve"]:
            arms.setdefault(r["arm"], []).append(r)
    for arm, members in arms.items():
        points: dict[float, list[float]] = {}
        for m in members:
            per = 1 / m["train_tokens_per_byte"] if in_bytes else 1.0
            for tokens, bpb in m["curve"]:
                points.setdefault(round(tokens * per), []).append(bpb)
        xs = sorted(points)
        means = [statistics.fmean(points[x]) for x in xs]
        stds = [statistics.stdev(points[x]) if len(points[x]) > 1 else 0.0 for x in xs]
        line, = ax.plot(xs, means, label=f"{arm} (n={len(members)})")
        ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                        color=line.get_color(), alpha=0.2)
    ax.set_xlabel(f"training {'bytes' if in_bytes else 'tokens'} (next-token targets, align + distill)")
    ax.set_ylabel("validation bits per byte")
    ax.set_title("Learning curves (mean over seeds, band = ±1 std)")
    if arms:
        ax.legend(fontsize=7)
    _save(fig, path)


def plot_token_efficiency_bands(records: list[dict], path, text: str = "persuasion") -> None:
    """Held-out bits/byte against training bytes (tokens when a run lacks its tokens per byte), per budget
    series: mean over seeds with ±1 std bars."""
    from eval.leaderboard import _axes, _save

    fig, ax = _axes((8, 5))
    key, amount = f"bpb_{text}", ("train_bytes" if _in_bytes(records) else "train_tokens")
    for base, members in _series(records).items():
        by_arm: dict[str, list[dict]] = {}
        for m in members:
            if m[key] is not None and m[amount]:
                by_arm.setdefault(m["arm"], []).append(m)
        pts = sorted((statistics.fmean(x[amount] for x in ms), *_mean_std([x[key] for x in ms]))
                     for ms in by_arm.values())
        if not pts:
            continue
        xs, ys, es = zip(*pts)
        ax.errorbar(xs, ys, yerr=[e or 0.0 for e in es], marker="o", capsize=3, label=base)
    ax.set_xscale("log")
    ax.set_xlabel(f"training {amount.split('_')[1]} (log)")
    ax.set_ylabel(f"held-out bits per byte ({text.capitalize()})")
    ax.set_title("Token efficiency (mean over seeds, bars = ±1 std)")
    ax.legend(fontsize=7)
    _save(fig, path)


def write_study_report(rows: list[dict], runs: list[StudyRun], runs_dir, out_dir) -> dict[str, str]:
    """summary.json (SUMMARY_KEYS per run), study.md (goals, table, goals answered from summary.json as
    written), learning_curves.png and token_efficiency.png (error bands) into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = summary_records(rows, runs, runs_dir)
    files = {"summary": out / "summary.json", "study": out / "study.md",
             "learning_curves": out / "learning_curves.png", "token_efficiency": out / "token_efficiency.png"}
    files["summary"].write_text(json.dumps([{k: r[k] for k in SUMMARY_KEYS} for r in records], indent=1) + "\n")
    stats = arm_stats(json.loads(files["summary"].read_text()))
    references = [r for r in rows if r["role"] != "student"]
    protocol = next((r.get("bpb_protocol") for r in rows if r.get("bpb_protocol")), None)
    text_bytes = next((r.get("bpb_bytes") for r in rows if r["role"] == "student" and r.get("bpb_bytes")), None)
    files["study"].write_text("# Study results (written by `make study`)\n\n"
                              + study_markdown(stats, goals(stats), references, protocol, text_bytes)
                              + "\n" + code_markdown(records) + "\n")
    plot_learning_bands(records, files["learning_curves"])
    plot_token_efficiency_bands(records, files["token_efficiency"])
    return {k: str(v) for k, v in files.items()}
