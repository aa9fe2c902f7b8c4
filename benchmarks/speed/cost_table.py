"""The old time model of speed to quality, kept as a second, labelled figure (--cost-table): each run's steps
priced by a table of step times measured separately (timing.py: per step kind, interleaved short runs, process
CPU time of one thread), the time of an evaluation the cumulative price of the steps before it.

It was the only time axis before the trainer measured its own time; it depends on the table (which moved between
sessions: the half/full ratio 0.585 -> 0.547 on faces20), and is drawn now to show how far the two axes agree.
"""

from __future__ import annotations

from . import plots, report
from .data import REGIMES
from .timing import as_rows, describe, step_costs, step_kinds, step_times
from .training import heldout_records


def measure(study) -> dict:
    """OUT/step_times.json and OUT/step_costs.json for the study's arms (measured once, then read)."""
    a = study.args
    times = step_times(a.out, study.arms, study.data, a.timing_rounds, a.timing_steps, a.regime)
    seconds = step_costs(a.out, times)
    print(f"cost table (step seconds): {describe(seconds)}", flush=True)
    return seconds


def priced_curve(records: list[dict], cfg, latent: int, seconds: dict) -> list[tuple[float, float]]:
    """(cost-table seconds of the steps before the evaluation, held-out loss) for a run's evaluations."""
    last = max((r["step"] for r in records), default=0)
    t = report.cumulative_seconds(list(step_kinds(cfg, last, latent)), seconds)
    return [(t[r["step"]], r["heldout_loss"]) for r in records]


def section(study, steps: dict) -> tuple[str, dict]:
    """The race on the cost-table axis (markdown), its figure NAME-curves-cost-table.png, and its results."""
    a = study.args
    seconds = measure(study)
    latent = REGIMES[a.regime].latent
    curves = {arm: {s: priced_curve(heldout_records(study.runs[arm, s], a.budget_s), study.configs[arm, s], latent,
                                    seconds) for s in study.seeds} for arm in study.arms}
    summary = {arm: {s: report.summarise_run(c) for s, c in by.items()} for arm, by in curves.items()}
    ups = report.speedups(curves, a.baseline)
    plots.plot_curves(curves, a.out / f"{study.name}-curves-cost-table.png",
                      study.title + "\nx: the cost-table model (steps priced by separately measured step times)",
                      xlabel="cost-table seconds (steps x measured cost of their kind), NOT the runs' own time")
    md = ("\nThe same runs on the cost-table time model (steps priced by step times measured apart), for "
          "comparison only:\n\n" + report.table(summary, ups, {}, a.baseline, steps))
    return md, {"cost_table": {"step_seconds": as_rows(seconds),
                               "curves": {arm: {str(s): c for s, c in by.items()} for arm, by in curves.items()}}}
