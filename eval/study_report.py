"""The report of a seeded study (`spikedistill study`): one record per run, mean +- std per arm, its two goals
answered from the records, and learning-curve and token-efficiency plots with error bands.

Inputs are leaderboard rows (eval.leaderboard.build_leaderboard: student rows carry `train`, the run's
training tokens, tokens/s and validation curve) and, per run, its arm and seed as the study driver ran it.

Record (docs/results/summary.json, one per run):
    {"arm", "kind": "ann_ce" | "ann_kd" | "snn_ce" | "snn_distill", "budget": fraction of the study's
     full budget, "seed", "train_tokens", "bpb_persuasion", "bpb_hamlet", "train_tokens_per_s"}
`train_tokens` counts next-token targets (align + distill, all ranks); `budget` is a run's train_tokens over
the largest train_tokens in the study. bits/byte are the shared windowed protocol of the evaluate stage
(the teacher's protocol too), on the held-out texts' first max_text_bytes.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path

TEXTS = ("persuasion", "hamlet")
SIGMAS = 3.0  # goal (i): the gain must exceed this many standard deviations of seed noise


@dataclass(frozen=True)
class StudyRun:
    """One run of a study: its run directory name, arm (the recipe's stem) and seed (None: the recipe's own)."""

    run: str
    arm: str
    seed: int | None


def uses_teacher(config: dict) -> bool:
    """True when a run's resolved config takes anything from the teacher: align, a KD or feature term in
    distill, or weights inherited from the teacher."""
    student = config.get("student") or {}
    weights = ((config.get("distill") or {}).get("weights") or {})
    align = config.get("align") or {}
    return bool(align.get("enabled")) or any(float(weights.get(k) or 0) > 0 for k in ("ea", "saa", "sfa", "sta")) \
        or bool(student.get("init_from_teacher"))


def run_kind(config: dict) -> str:
    """"ann" or "snn" (student.arch) + "_ce" (CE only, nothing from the teacher), else "_kd" for the ANN (the
    matched Llama takes only logit KD and inherited weights) and "_distill" for the spiking student."""
    if (config.get("student") or {}).get("arch") == "llama":
        return "ann_kd" if uses_teacher(config) else "ann_ce"
    return "snn_distill" if uses_teacher(config) else "snn_ce"


def _run_config(runs_dir: Path, run: str) -> dict:
    import yaml

    try:
        return yaml.safe_load((runs_dir / run / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError):
        return {}


def summary_records(rows: list[dict], runs: list[StudyRun], runs_dir: str | Path) -> list[dict]:
    """One summary.json record per study run that has a student row (see the module docstring), by arm and seed."""
    by_run = {r["run"]: r for r in rows if r["role"] == "student"}
    records = []
    for sr in sorted(runs, key=lambda r: (r.arm, -1 if r.seed is None else r.seed)):
        row = by_run.get(sr.run)
        if row is None:
            continue
        train = row.get("train") or {}
        records.append({
            "arm": sr.arm,
            "run": sr.run,
            "kind": run_kind(_run_config(Path(runs_dir), sr.run)),
            "seed": sr.seed,
            "train_tokens": train.get("tokens"),
            **{f"bpb_{t}": row["bits_per_byte"].get(t) for t in TEXTS},
            "train_tokens_per_s": train.get("tokens_per_s"),
            "energy_pj": row.get("energy_pj"),
            "memory_inclusive_pj": row.get("memory_inclusive_pj"),
            "mean_firing_rate": row.get("mean_firing_rate"),
            "curve": train.get("curve") or [],
            "series": train.get("series") or sr.arm,
        })
    full = max((r["train_tokens"] or 0 for r in records), default=0)
    for r in records:
        r["budget"] = round(r["train_tokens"] / full, 4) if full and r["train_tokens"] else None
    return records


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def arm_stats(records: list[dict]) -> list[dict]:
    """Per arm (in first-seen order): kind, budget, seeds, and mean/std of every numeric field."""
    arms: dict[str, list[dict]] = {}
    for r in records:
        arms.setdefault(r["arm"], []).append(r)
    out = []
    for arm, members in arms.items():
        stat = {"arm": arm, "kind": members[0]["kind"], "budget": members[0]["budget"],
                "series": members[0]["series"],
                "seeds": [m["seed"] for m in members], "n": len(members)}
        for key in ("train_tokens", "bpb_persuasion", "bpb_hamlet", "train_tokens_per_s", "energy_pj",
                    "memory_inclusive_pj", "mean_firing_rate"):
            stat[key], stat[f"{key}_std"] = _mean_std([m[key] for m in members])
        stat["bpb_mean"], stat["bpb_mean_std"] = _mean_std(
            [statistics.fmean([m[f"bpb_{t}"] for t in TEXTS]) for m in members
             if all(m[f"bpb_{t}"] is not None for t in TEXTS)])
        out.append(stat)
    return out


def _pooled_std(*stds: float | None) -> float | None:
    """Root mean square of the arms' seed standard deviations (None unless every arm has one)."""
    if not stds or any(s is None for s in stds):
        return None
    return math.sqrt(sum(s * s for s in stds) / len(stds))


def goals(stats: list[dict], text: str = "persuasion") -> dict:
    """The study's two goals, answered from the per-arm statistics on `text` (bits/byte, lower is better).

    (i) the best distillation arm at the full budget beats CE-only at the full budget by more than SIGMAS
        standard deviations of seed noise (the pooled seed std of the two arms);
    (ii) the best distillation arm's series (the arms that differ from it only in budget) at 1/4 of the budget
        matches or beats CE-only at the full budget.
    "Best" = lowest mean bits/byte among snn_distill arms at budget 1. When the best arm has no 1/4-budget
    series, (ii) is answered for the best-ranked distillation arm that has one (named in "quarter_arm").
    Missing arms answer None.
    """
    key = f"bpb_{text}"
    full = [s for s in stats if s["budget"] is not None and s["budget"] >= 0.99 and s[key] is not None]
    ce = next((s for s in full if s["kind"] == "snn_ce"), None)
    distill = sorted((s for s in full if s["kind"] == "snn_distill"), key=lambda s: s[key])
    best = distill[0] if distill else None
    out = {"text": text, "sigmas": SIGMAS, "ce_arm": ce and ce["arm"], "best_arm": best and best["arm"],
           "i": None, "ii": None}
    if ce is None or best is None:
        return out
    gain = ce[key] - best[key]
    noise = _pooled_std(ce[f"{key}_std"], best[f"{key}_std"])
    out["gain"], out["noise_std"] = gain, noise
    out["gain_in_sigmas"] = gain / noise if noise else None
    out["i"] = None if noise is None else bool(noise and gain > SIGMAS * noise)  # None: < 2 seeds in an arm
    quarters = [s for s in stats if s["budget"] is not None and abs(s["budget"] - 0.25) < 0.05
                and s[key] is not None]
    quarter = next(([q for q in quarters if q["series"] == arm["series"]] for arm in distill
                    if any(q["series"] == arm["series"] for q in quarters)), [])
    if quarter:
        q = quarter[0]
        out["quarter_arm"], out["quarter_bpb"], out["ce_full_bpb"] = q["arm"], q[key], ce[key]
        out["quarter_of_best"] = q["series"] == best["series"]
        out["ii"] = q[key] <= ce[key]
    return out


def _pm(mean: float | None, std: float | None, fmt: str = "{:.3f}") -> str:
    if mean is None:
        return ""
    return fmt.format(mean) + ("" if std is None else " ± " + fmt.format(std))


def _uj(s: dict, key: str) -> str:
    """An energy figure of an arm (pJ mean and std) in µJ."""
    mean, std = s.get(key), s.get(f"{key}_std")
    return _pm(None if mean is None else mean / 1e6, None if std is None else std / 1e6, "{:,.2f}")


def study_markdown(stats: list[dict], answer: dict, references: list[dict] | None = None,
                   protocol: str | None = None) -> str:
    """The per-arm table (mean ± sample std over seeds), energy-only reference rows (leaderboard rows of the
    teacher and the quantised matched ANN: `references`) and the goals' answers, as markdown."""
    lines = [
        ("| arm | kind | budget | seeds | train tokens | bpb Persuasion | bpb Hamlet | train tok/s "
         "| energy/token compute (µJ) | memory-incl. (µJ) | firing rate |"),
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in stats:
        seeds = ",".join("-" if x is None else str(x) for x in s["seeds"])
        lines.append(
            f"| {s['arm']} | {s['kind']} | {s['budget']:.2f} | {seeds} | {s['train_tokens']:,.0f} | "
            f"{_pm(s['bpb_persuasion'], s['bpb_persuasion_std'])} | {_pm(s['bpb_hamlet'], s['bpb_hamlet_std'])} | "
            f"{_pm(s['train_tokens_per_s'], s['train_tokens_per_s_std'], '{:.0f}')} | "
            f"{_uj(s, 'energy_pj')} | {_uj(s, 'memory_inclusive_pj')} | "
            f"{_pm(s['mean_firing_rate'], s['mean_firing_rate_std'])} |")
    for r in references or []:
        bpb = r.get("bits_per_byte") or {}
        lines.append(
            f"| {r['label']} ({r['role']}) | | | | | {_pm(bpb.get('persuasion'), None)} | "
            f"{_pm(bpb.get('hamlet'), None)} | | {_uj(r, 'energy_pj')} | {_uj(r, 'memory_inclusive_pj')} | |")
    lines += ["", ("mean ± sample standard deviation over the arm's seeds (no ± with one seed). Bits/byte: the "
              "held-out texts, student and teacher under one protocol"
              + (f" ({protocol})" if protocol else "") + ". Energy per token from the measured firing rates "
              "(eval/README.md): compute only, and memory-inclusive (weights, activations and state moved per "
              "token); the quantised matched-ANN rows are energy only."), ""]
    lines.append(goals_markdown(answer))
    return "\n".join(lines) + "\n"


def goals_markdown(a: dict) -> str:
    """The answers to goals (i) and (ii) in words, with their numbers."""
    if a["ce_arm"] is None or a["best_arm"] is None:
        return (f"Goals: not answerable from these runs (CE-only arm: {a['ce_arm']}, best distillation arm: "
                f"{a['best_arm']}; both are needed at the full budget).")
    text = [(f"Goals, on {a['text'].capitalize()} bits/byte (best distillation arm: {a['best_arm']}; CE-only: "
            f"{a['ce_arm']}):")]
    if a["i"] is None:
        text.append(f"- (i) gain over CE-only at equal tokens {a['gain']:+.3f} bits/byte; seed noise unknown (an arm "
                    "has one seed; >= 2 each are needed): not answered.")
    else:
        sig = "" if a.get("gain_in_sigmas") is None else f" = {a['gain_in_sigmas']:.1f} sigma"
        text.append(f"- (i) gain over CE-only at equal tokens {a['gain']:+.3f} bits/byte, seed noise (pooled std) "
                    f"{a['noise_std']:.3f}{sig}: **{'met' if a['i'] else 'not met'}** (needs > {a['sigmas']:.0f} "
                    "sigma).")
    if a["ii"] is None:
        text.append("- (ii) no 1/4-budget run of the best arm: not answered.")
    else:
        which = "" if a.get("quarter_of_best", True) else (
            f" ({a['best_arm']} has no 1/4-budget run; answered for the best distillation arm that has one)")
        text.append(f"- (ii) {a['quarter_arm']} at 1/4 of the tokens {a['quarter_bpb']:.3f} vs CE-only at the full "
                    f"budget {a['ce_full_bpb']:.3f}: **{'met' if a['ii'] else 'not met'}**{which}.")
    return "\n".join(text)


def _series(records: list[dict]) -> dict[str, list[dict]]:
    """Budget series (runs that differ only in budget and seed, eval.leaderboard.series_key), each named by
    its largest-budget arm."""
    groups: dict[str, list[dict]] = {}
    for r in records:
        groups.setdefault(r["series"], []).append(r)
    return {max(ms, key=lambda m: m["train_tokens"] or 0)["arm"]: ms for ms in groups.values()}


def plot_learning_bands(records: list[dict], path) -> None:
    """Validation bits/byte against training tokens: per arm the mean over seeds, shaded +- one std."""
    from eval.leaderboard import _axes, _save

    fig, ax = _axes((8, 5))
    arms: dict[str, list[dict]] = {}
    for r in records:
        if r["curve"]:
            arms.setdefault(r["arm"], []).append(r)
    for arm, members in arms.items():
        points: dict[float, list[float]] = {}
        for m in members:
            for tokens, bpb in m["curve"]:
                points.setdefault(round(tokens), []).append(bpb)
        xs = sorted(points)
        means = [statistics.fmean(points[x]) for x in xs]
        stds = [statistics.stdev(points[x]) if len(points[x]) > 1 else 0.0 for x in xs]
        line, = ax.plot(xs, means, label=f"{arm} (n={len(members)})")
        ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)],
                        color=line.get_color(), alpha=0.2)
    ax.set_xlabel("training tokens (next-token targets, align + distill)")
    ax.set_ylabel("validation bits per byte")
    ax.set_title("Learning curves (mean over seeds, band = ±1 std)")
    if arms:
        ax.legend(fontsize=7)
    _save(fig, path)


def plot_token_efficiency_bands(records: list[dict], path, text: str = "persuasion") -> None:
    """Held-out bits/byte against training tokens, per budget series: mean over seeds with ±1 std bars."""
    from eval.leaderboard import _axes, _save

    fig, ax = _axes((8, 5))
    key = f"bpb_{text}"
    for base, members in _series(records).items():
        by_arm: dict[str, list[dict]] = {}
        for m in members:
            if m[key] is not None and m["train_tokens"]:
                by_arm.setdefault(m["arm"], []).append(m)
        pts = sorted((statistics.fmean(x["train_tokens"] for x in ms), *_mean_std([x[key] for x in ms]))
                     for ms in by_arm.values())
        if not pts:
            continue
        xs, ys, es = zip(*pts)
        ax.errorbar(xs, ys, yerr=[e or 0.0 for e in es], marker="o", capsize=3, label=base)
    ax.set_xscale("log")
    ax.set_xlabel("training tokens (log)")
    ax.set_ylabel(f"held-out bits per byte ({text.capitalize()})")
    ax.set_title("Token efficiency (mean over seeds, bars = ±1 std)")
    ax.legend(fontsize=7)
    _save(fig, path)


def write_study_report(rows: list[dict], runs: list[StudyRun], runs_dir, out_dir) -> dict[str, str]:
    """summary.json, study.md, learning_curves.png and token_efficiency.png (error bands) into out_dir."""
    out = Path(out_dir)
    records = summary_records(rows, runs, runs_dir)
    stats = arm_stats(records)
    answer = goals(stats)
    files = {"summary": out / "summary.json", "study": out / "study.md",
             "learning_curves": out / "learning_curves.png", "token_efficiency": out / "token_efficiency.png"}
    keys = ("arm", "kind", "budget", "seed", "train_tokens", "bpb_persuasion", "bpb_hamlet", "train_tokens_per_s")
    files["summary"].write_text(json.dumps([{k: r[k] for k in keys} for r in records], indent=1) + "\n")
    references = [r for r in rows if r["role"] != "student"]
    protocol = next((r.get("bpb_protocol") for r in rows if r.get("bpb_protocol")), None)
    files["study"].write_text("# Study results (written by `make study`)\n\n"
                              + study_markdown(stats, answer, references, protocol))
    plot_learning_bands(records, files["learning_curves"])
    plot_token_efficiency_bands(records, files["token_efficiency"])
    return {k: str(v) for k, v in files.items()}
