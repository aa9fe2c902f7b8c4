"""The race of arms on their own measured training time, read from their runs' logs: held-out curves, the time
each arm takes to reach the baseline's best (report.py), samples' FID/KID/SWD, figures and markdown.

One home for what speed to quality (to_quality.py) and the flow fine-tune (finetune/flow_speed.py) report: both
hand over a Race (which run folder is which arm and seed, the budget and grid fixed before running) and get the
same table, figures and JSON.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import plots, report
from .samples import sample_metrics
from .training import heldout_curve, heldout_records, sigma_curves, steps_taken

EVALUATION_KEYS = ("step", "kimg", "train_s", "heldout_loss", "heldout_per_sigma")


@dataclass(frozen=True)
class Race:
    """The runs raced and the rules they ran under."""

    runs: dict[tuple[str, int], Path]  # (arm, seed) -> run folder
    arms: list[str]
    seeds: list[int]
    budget_s: float  # each run's own training seconds
    eval_every_s: float
    baseline: str  # the arm whose best held-out loss the others race to
    title: str

    def per_run(self, read) -> dict[str, dict[int, object]]:
        """{arm: {seed: read(run folder, budget)}}."""
        return {arm: {s: read(self.runs[arm, s], self.budget_s) for s in self.seeds} for arm in self.arms}


@dataclass(frozen=True)
class Samples:
    """Samples of each arm's best checkpoint (the first seed's), scored against `reference` images."""

    reference: Path
    n: int
    steps: int
    folder: Path  # samples go to folder/ARM
    prompt: str | None = None  # a text run's caption


def by_seed_str(table: dict) -> dict:
    """{arm: {seed: x}} with the seeds as JSON keys."""
    return {arm: {str(s): x for s, x in by.items()} for arm, by in table.items()}


def evaluations(race: Race) -> dict[str, dict[int, list[dict]]]:
    """Every held-out evaluation within the budget, reduced to the keys the results keep."""
    return race.per_run(lambda run, budget: [{k: r[k] for k in EVALUATION_KEYS if k in r}
                                             for r in heldout_records(run, budget)])


def race_section(race: Race, sigmas: list[float], prefix: Path, samples: Samples | None) -> tuple[str, dict]:
    """The race's markdown (its table, then the held-out loss per noise level), the figures PREFIX-curves.png,
    PREFIX-sigmas.png and (with samples) PREFIX-grids.png, and what it reports: {curves, sigma_curves, summary,
    speedups, metrics, steps}, keyed {arm: {seed: ...}} (JSON: by_seed_str)."""
    curves, per_sigma = race.per_run(heldout_curve), race.per_run(sigma_curves)
    summary = {arm: {s: report.summarise_run(c) for s, c in by.items()} for arm, by in curves.items()}
    ups = report.speedups(curves, race.baseline)
    steps = race.per_run(steps_taken)
    metrics, grids = {}, {}
    if samples is not None:
        first = {arm: race.runs[arm, race.seeds[0]] for arm in race.arms}
        metrics, grids = sample_metrics(first, {"reference": samples.reference}, samples.folder, samples.n,
                                        samples.steps, prompt=samples.prompt)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    plots.plot_curves(curves, prefix.parent / f"{prefix.name}-curves.png", race.title)
    plots.plot_sigma_curves(per_sigma, sigmas, prefix.parent / f"{prefix.name}-sigmas.png", race.title)
    if grids:
        given = "" if samples.prompt is None else f" given '{samples.prompt}'"
        plots.grid_figure(grids, prefix.parent / f"{prefix.name}-grids.png", f"{samples.n} samples of each arm's "
                          f"best checkpoint (seed {race.seeds[0]}){given}, first 64")
    md = f"{race.title}\n\n" + report.table(summary, ups, metrics, race.baseline, steps)
    md += "\nHeld-out loss per noise level (mean over seeds) at the evaluations of fixed training times:\n\n"
    md += report.sigma_table(per_sigma, sigmas, race.budget_s, every=race.eval_every_s)
    return md, {"curves": curves, "sigma_curves": per_sigma, "summary": summary, "speedups": ups,
                "metrics": metrics, "steps": steps}


def results_json(race: Race, sigmas: list[float], found: dict) -> dict:
    """The results file's common part: every evaluation and everything race_section reported, seeds as keys."""
    keyed = {k: by_seed_str(found[k]) for k in ("curves", "sigma_curves", "summary", "speedups")}
    return {"time": "each run's own train_s (process CPU seconds, one thread)",
            "evaluations": by_seed_str(evaluations(race)), "sigmas": sigmas, **keyed,
            "metrics": found["metrics"], "steps": found["steps"]}
