"""The learning-rate sweep of a study arm: which rates to try, which one wins, and the sweep's table.

An arm whose recipe sets `study.lr_grid` (e.g. [1.0e-3, 2.0e-3, 4.0e-3]) first trains its first seed once per
rate, through the distill stage. The rate with the lowest final validation bits/byte of distill (its
done.json `val_bits_per_byte`: the in-distribution validation split, never the held-out evaluation texts)
wins; ties go to the lower rate, and a run whose validation bits/byte is not finite, or that stopped on
non-finite losses (a "diverged" row last in its metrics.jsonl), loses to every finite one.
A winner at an edge of the rates tried adds the next point beyond that edge (half the lowest rate, or twice
the highest), up to `study.lr_extensions` times per edge, so that the chosen rate is never at an edge unless
that cap was hit (`at_edge` in the table). The arm's other seeds then run at the chosen rate.

Each rate sets every key of `study.lr_keys` (distill's and align's optimiser lr by default); each of those
optimisers' `min_lr` keeps the recipe's min_lr / lr ratio (the base: 1e-4 / 2e-3 = 0.05 for distill), so the
cosine schedule has the same shape at every rate. Warm-up steps stay as the recipe sets them.

`lr_sweep` is the choice alone (a pure function of the results so far); `sweep_record`, `sweep_markdown` and
`write_sweep_report` give the table (sweep.json and sweep.md in the study's report folder).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from pipeline.schema import lr_label

EXTEND_FACTOR = 2.0  # each extension goes one factor of 2 beyond the edge


@dataclass(frozen=True)
class Sweep:
    """The state of one arm's sweep.

    points: every rate tried or to try, ascending; pending: those without a result yet (to run next);
    chosen: the winning rate once every point has a result and no edge needs extending, else None;
    at_edge: the winner is the lowest or highest point (only when the extension cap was hit)."""

    points: tuple[float, ...]
    pending: tuple[float, ...]
    chosen: float | None
    at_edge: bool


def _score(value: float) -> float:
    return value if math.isfinite(value) else math.inf


def lr_sweep(grid: list[float], results: dict[float, float], extensions: int) -> Sweep:
    """The sweep's next points or its choice, from `results` {rate: final validation bits/byte} so far.

    `grid` holds the initial rates (any order); `extensions` caps the points added beyond each edge. The
    added rates are exact halvings and doublings, so a result keyed by one of them is found again."""
    points, low, high = sorted(grid), 0, 0
    while True:
        pending = tuple(lr for lr in points if lr not in results)
        if pending:
            return Sweep(tuple(points), pending, None, False)
        best = min(points, key=lambda lr: (_score(results[lr]), lr))
        if best == points[0] and low < extensions:
            points.insert(0, best / EXTEND_FACTOR)
            low += 1
        elif best == points[-1] and high < extensions:
            points.append(best * EXTEND_FACTOR)
            high += 1
        else:
            return Sweep(tuple(points), (), best, best in (points[0], points[-1]))


def sweep_record(arm: str, seed: int | None, grid: list[float], sweep: Sweep, results: dict[float, float],
                 point_runs: dict[float, str], final_runs: list[tuple[str, int | None]]) -> dict:
    """One arm's row of sweep.json: its points (rate, run, validation bits/byte: None when not run yet or
    not finite, `diverged` true for the latter), the chosen rate, whether it is at an edge, how many points
    were added beyond the grid, and the runs at the chosen rate."""
    def point(lr: float) -> dict:
        value = results.get(lr)
        finite = value is not None and math.isfinite(value)
        return {"lr": lr, "run": point_runs[lr], "val_bpb": value if finite else None,
                "diverged": value is not None and not finite}

    return {
        "arm": arm, "seed": seed, "grid": sorted(grid),
        "points": [point(lr) for lr in sweep.points],
        "chosen_lr": sweep.chosen, "at_edge": sweep.at_edge if sweep.chosen is not None else None,
        "extensions": len(sweep.points) - len(grid),
        "runs": [{"run": run, "seed": s, "lr": sweep.chosen} for run, s in final_runs],
    }


def sweep_markdown(records: list[dict]) -> str:
    """The sweep's table: per arm, validation bits/byte at each rate (the chosen one in bold), the chosen
    rate and whether it sits at an edge of the rates tried."""
    lines = ["| arm | seed | validation bits/byte by learning rate | chosen lr | at an edge |",
             "|---|---|---|---:|---|"]
    for r in records:
        cells = []
        for p in r["points"]:
            value = "diverged" if p["diverged"] else "not run yet" if p["val_bpb"] is None else f"{p['val_bpb']:.4f}"
            cell = f"{lr_label(p['lr'])}: {value}"
            cells.append(f"**{cell}**" if p["lr"] == r["chosen_lr"] else cell)
        chosen = "undecided" if r["chosen_lr"] is None else lr_label(r["chosen_lr"])
        edge = "" if r["at_edge"] is None else ("yes (extension cap hit)" if r["at_edge"] else "no")
        seed = "-" if r["seed"] is None else r["seed"]
        lines.append(f"| {r['arm']} | {seed} | {', '.join(cells)} | {chosen} | {edge} |")
    lines += ["", ("Each arm's learning rate is chosen on its first seed by the final validation bits/byte of "
                   "distill (the in-distribution validation split, not the held-out texts); ties go to the lower "
                   "rate, and a winner at an edge adds the next factor-2 rate beyond it (pipeline/sweep.py). "
                   "The arm's other seeds run at the chosen rate.")]
    return "\n".join(lines) + "\n"


def write_sweep_report(records: list[dict], out_dir: str | Path) -> dict[str, str]:
    """sweep.json ({"arms": records, "runs": [{"run", "arm", "seed", "lr"}] for every run at a chosen rate})
    and sweep.md (sweep_markdown) into out_dir; returns {name: path}."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = [{"run": run["run"], "arm": r["arm"], "seed": run["seed"], "lr": run["lr"]}
            for r in records for run in r["runs"]]
    files = {"sweep": out / "sweep.json", "sweep_table": out / "sweep.md"}
    files["sweep"].write_text(json.dumps({"arms": records, "runs": runs}, indent=1) + "\n")
    files["sweep_table"].write_text("# Learning-rate sweep (written by `make study`)\n\n" + sweep_markdown(records))
    return {k: str(v) for k, v in files.items()}
