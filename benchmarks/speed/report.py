"""The analysis of speed to quality: curves of held-out loss against training seconds, crossings, tables.

A curve is [(training seconds, loss)] at a run's held-out evaluations; the seconds are the run's own (its logged
`train_s`), or, for the old time model (cost_table.py), the cumulative price of its steps in a table of step
times measured apart (the helpers for that table are here too).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable

StepKind = tuple[int, int, int, bool]  # (patch height, patch width, batch, routed)


def pooled(seconds: dict[str, dict[StepKind, float]]) -> dict[StepKind, float]:
    """One cost per step kind: the median over the arms that took it. Arms differ in which kinds of step they
    take, not in what a kind costs (sigma_data, crop alignment and EMA snapshots change no FLOPs), so
    pooling keeps the drift of a shared machine between one arm's timing rounds out of the comparison."""
    by_kind: dict[StepKind, list[float]] = {}
    for per_arm in seconds.values():
        for kind, v in per_arm.items():
            by_kind.setdefault(kind, []).append(v)
    return {kind: statistics.median(v) for kind, v in by_kind.items()}


def settled_costs(frozen: dict[StepKind, float], seconds: dict[str, dict[StepKind, float]]) -> dict[StepKind, float]:
    """The cost of each step kind that every time axis of one --out uses: the costs it already used (`frozen`),
    and the pool over the measured arms for kinds it has not used yet. Re-pooling after an arm is added would
    move the time axis, and so the figures, of runs already trained and reported."""
    return {**pooled(seconds), **frozen}


def cumulative_seconds(kinds: list[StepKind], seconds: dict[StepKind, float]) -> list[float]:
    """t[s] = training seconds after s steps (t[0] = 0)."""
    out = [0.0]
    for kind in kinds:
        out.append(out[-1] + seconds[kind])
    return out


def steps_within(kinds: Iterable[StepKind], seconds: dict[StepKind, float], budget_s: float) -> int:
    """The number of steps whose cumulative time first reaches `budget_s` (all of them if it never does)."""
    t, n = 0.0, 0
    for n, kind in enumerate(kinds, start=1):
        t += seconds[kind]
        if t >= budget_s:
            break
    return n


def crossing(curve: list[tuple[float, float]], target: float) -> float:
    """First time a (time, loss) curve is at or below `target`, linear between evaluations; inf if never."""
    previous = None
    for t, loss in curve:
        if loss <= target:
            if previous is None or previous[1] == loss:
                return t
            t0, l0 = previous
            return t0 + (t - t0) * (l0 - target) / (l0 - loss)
        previous = (t, loss)
    return math.inf


def summarise_run(curve: list[tuple[float, float]]) -> dict:
    best_t, best = min(curve, key=lambda p: p[1])
    return {"best": best, "best_s": best_t, "final": curve[-1][1], "end_s": curve[-1][0],
            "at_half": _loss_at(curve, curve[-1][0] / 2)}


def _loss_at(curve: list[tuple[float, float]], t: float) -> float:
    """The last evaluated loss at or before time t."""
    return [loss for s, loss in curve if s <= t][-1]


def speedups(curves: dict[str, dict[int, list[tuple[float, float]]]], baseline: str) -> dict[str, dict]:
    """Per arm and seed: the time to reach the baseline arm's (same seed) best loss, and the ratio
    t_baseline_best / t_arm (> 1: sooner)."""
    out: dict[str, dict] = {}
    for arm, by_seed in curves.items():
        rows = {}
        for seed, curve in by_seed.items():
            base = curves[baseline].get(seed)
            if base is None:
                continue
            target_t, target = min(base, key=lambda p: p[1])
            t = crossing(curve, target)
            rows[seed] = {"target": target, "baseline_s": target_t, "arm_s": t,
                          "ratio": target_t / t if 0 < t < math.inf else (math.inf if t == 0 else math.nan)}
        out[arm] = rows
    return out


def spread(values: list[float], digits: int = 3) -> str:
    """mean (min-max) over seeds; seeds that never got there (inf, nan) are counted, not averaged."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "never"
    mean = statistics.fmean(finite)
    text = f"{mean:.{digits}f}"
    if len(finite) > 1:
        text += f" ({min(finite):.{digits}f}-{max(finite):.{digits}f})"
    return text if len(finite) == len(values) else f"{text}, {len(values) - len(finite)} of {len(values)} never"


def table(summary: dict[str, dict[int, dict]], ups: dict[str, dict], metrics: dict[str, dict], baseline: str,
          steps: dict[str, dict[int, int]]) -> str:
    """The markdown table: per arm mean (min-max over seeds)."""
    lines = [f"| arm | steps | best held-out loss | at s | final loss | s to {baseline}'s best | x sooner "
             "| FID | KID x1e3 | SWD x1e3 |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for arm, by_seed in summary.items():
        rows = list(by_seed.values())
        up = list(ups.get(arm, {}).values())
        m = metrics.get(arm, {})
        fid = f"{m['fid']:.1f}" if "fid" in m else "-"
        kid = f"{1e3 * m['kid']:.1f} ± {1e3 * m['kid_std']:.1f}" if "kid" in m else "-"
        swd = f"{m['swd']:.1f}" if "swd" in m else "-"
        lines.append(
            f"| {arm} | {round(statistics.fmean(steps[arm].values()))} | {spread([r['best'] for r in rows], 4)} | "
            f"{spread([r['best_s'] for r in rows], 0)} | {spread([r['final'] for r in rows], 4)} | "
            f"{spread([u['arm_s'] for u in up], 0)} | {spread([u['ratio'] for u in up], 2)} | {fid} | {kid} | {swd} |")
    return "\n".join(lines) + "\n"


SigmaCurve = list[tuple[float, list[float]]]  # (training seconds, held-out loss at each noise level)


def sigma_at(curve: SigmaCurve, t: float) -> list[float] | None:
    """The per-noise-level losses of the evaluation of time t: the first at or after it (a run is evaluated after
    the first step whose training time reaches each point of its grid, and stops after the first to reach its
    budget); None if the curve ends before t."""
    due = [losses for s, losses in curve if s >= t]
    return due[0] if due else None


def sigma_table(per_sigma: dict[str, dict[int, SigmaCurve]], sigmas: list[float], budget_s: float,
                fractions: tuple[float, ...] = (0.25, 0.5, 1.0), every: float | None = None) -> str:
    """Markdown: per arm and fixed time (fractions of the budget), the held-out loss at each noise level at the
    evaluation of that time, mean over seeds; the lowest of the arms at each (time, sigma) in bold. Where patch
    training wins or loses. With `every` (the evaluation grid's interval) each time is the grid point nearest to
    its fraction of the budget (at least the first, at most the budget: a run's last evaluation is at its budget,
    which need not be on the grid), so that a row is the evaluation of the time it names."""
    head = "| at s | arm | " + " | ".join(f"σ {s:.3g}" for s in sigmas) + " |"
    lines = [head, "|---:|---|" + "---:|" * len(sigmas)]
    for f in fractions:
        t = f * budget_s if every is None else min(budget_s, every * max(1, round(f * budget_s / every)))
        rows = {}
        for arm, by_seed in per_sigma.items():
            found = [v for v in (sigma_at(c, t) for c in by_seed.values()) if v is not None]
            if found:
                rows[arm] = [statistics.fmean(col) for col in zip(*found)]
        best = [min(r[k] for r in rows.values()) for k in range(len(sigmas))] if rows else []
        for arm, values in rows.items():
            cells = [f"**{v:.4f}**" if v == best[k] and len(rows) > 1 else f"{v:.4f}" for k, v in enumerate(values)]
            lines.append(f"| {t:.0f} | {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
