"""Speed to quality of a flow-matching fine-tune (issue 32): patches against full size, from a base trained here.

An SD3-shaped base (flow_base.py: StableDiffusion3Pipeline, 4 blocks of width 128, 256 image tokens beside 32 text
tokens at 128 px) is pretrained by latentpatch on captioned digits at full size and exported as a pipeline folder;
each arm fine-tunes that folder on faces (another domain) with `lp.finetune`, the crop's place told through SD3's
own position table (no extra channels), for a budget of its own training time (process CPU seconds of one thread,
the trainer's clock), evaluated on the 20 held-out faces at equal intervals of that time (timed_run.TimeGrid). The
race and its tables are speed to quality's (speed/race.py): the time each arm takes to reach full size's best
held-out loss, 3 seeds; FID/KID/SWD of samples of each arm's best checkpoint (seed 0) given the face caption,
against the 100 faces.

    OMP_NUM_THREADS=1 python -m benchmarks.finetune.flow_speed --out OUT --jobs 2
    OMP_NUM_THREADS=1 python -m benchmarks.finetune.flow_speed --out OUT --quick     # the wiring, minutes

(`--pretrain-only` first, then the same command without it: the base takes its fixed steps beside other work.)

Writes OUT/flow-speed-results.json (every evaluation of every run), OUT/flow-speed-table.md and the figures
OUT/flow-speed-{curves,sigmas,grids}.png. A killed call reruns: finished runs are kept, a killed one resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from latentpatch.io import atomic_write_text, write_json_atomic

from ..one_thread import run_python, side_by_side
from ..speed.arms import ARMS
from ..speed.data import N_FACES, write_faces
from ..speed.race import Race, Samples, race_section, results_json
from ..speed.timed_run import TimeGrid, finished
from ..speed.training import NO_STEP_EVALUATIONS
from . import flow_base
from .captioned import DIGITS, FACE_CAPTION, FACES
from .channel_runs import Pretraining


@dataclass(frozen=True)
class FlowPlan:
    """Fixed before running: the same for every arm and seed."""

    pretraining: Pretraining
    budget_s: float  # each fine-tune's own training seconds
    eval_every_s: float
    batch_size: int  # full size's; a half-side crop step takes twice as many (the schedule's batch growth)
    lr: float
    samples: int  # per arm, of seed 0's best checkpoint
    sample_steps: int
    arms: tuple[str, ...]
    seeds: tuple[int, ...]


PLAN = FlowPlan(Pretraining(steps=2000, batch_size=16, lr=5e-4, eval_every=250), budget_s=600.0, eval_every_s=50.0,
                batch_size=16, lr=2e-4, samples=256, sample_steps=20,
                arms=("full-size", "half-crops", "half-crops/real_p0.25"), seeds=(0, 1, 2))
QUICK = FlowPlan(Pretraining(steps=20, batch_size=8, lr=5e-4, eval_every=10), budget_s=12.0, eval_every_s=4.0,
                 batch_size=8, lr=2e-4, samples=8, sample_steps=4, arms=("full-size", "half-crops"), seeds=(0, 1))
BASELINE = "full-size"
PINNED = ["patches.real_p=0.5", "patches.sizes=[0.5]"]  # the default schedule, pinned as speed/arms.COMMON pins it


def finetune_overrides(arm: str, heldout: Path, seed: int) -> list[str]:
    """The arm's patch schedule (speed to quality's names: full-size, half-crops = the library's default, ...) and
    the settings every arm shares: held-out faces scored when the time grid asks, no early stop, caption dropout
    for guidance."""
    return [*PINNED, *ARMS[arm], f"heldout.latents={heldout}", f"heldout.every={NO_STEP_EVALUATIONS}",
            "heldout.limit=20", "train.patience=0", f"train.seed={seed}", "train.log_every=50",
            "train.label_dropout=0.1", "model.attention=sdpa", "train.keep_checkpoints=1", "heldout.keep_best=true",
            *flow_base.TEXT]


def run_one(job: dict) -> None:
    """In its own process, one thread: the base's pretraining (arm "base") or one timed fine-tune."""
    import latentpatch as lp

    torch.set_num_threads(1)
    out, stores, plan = Path(job["out"]), {k: Path(v) for k, v in job["stores"].items()}, job["plan"]
    if job["arm"] == "base":
        flow_base.pretrain(Path(job["random_base"]), stores, out, Pretraining(**plan["pretraining"]))
        return
    if finished(out, plan["budget_s"]):
        return
    lp.finetune(job["base"], stores["new-train"], out, steps=NO_STEP_EVALUATIONS, lr=plan["lr"],
                batch_size=plan["batch_size"], overrides=finetune_overrides(job["arm"], stores["new-heldout"],
                                                                              job["seed"]),
                resume=(out / "config.yaml").is_file(), device="cpu", progress=False,
                callback=TimeGrid(plan["budget_s"], plan["eval_every_s"]))


def launch(jobs: list[dict], workers: int) -> None:
    side_by_side(lambda job: run_python(["-m", "benchmarks.finetune.flow_speed", "--run", json.dumps(job)],
                                        f"{job['arm']} seed {job['seed']}"), jobs, workers)


def heldout_levels(run: Path) -> list[float]:
    """The fixed noise levels every evaluation scores (the flow objective's own mid-quantiles for the full image)."""
    from latentpatch.config import load_saved_config
    from latentpatch.denoiser import heldout_grid

    cfg = load_saved_config(run / "config.yaml")
    side = flow_base.SIDE // 4
    return [float(s) for s in heldout_grid(cfg)(cfg.heldout.sigmas, (side, side))]


def results(plan: FlowPlan, out: Path, runs: dict[tuple[str, int], Path], reference: Path, started: float) -> dict:
    """The race, its per-noise-level table, samples' metrics and figures (speed/race.py); written beside the runs."""
    latent = flow_base.SIDE // 4
    title = (f"SD3-shaped base fine-tuned on faces at {flow_base.SIDE} px ({latent}x{latent} latents); "
             f"{plan.budget_s:.0f} training-s per run (own process CPU time), evaluated every {plan.eval_every_s:g} "
             f"s; seeds {list(plan.seeds)}")
    race = Race(runs, list(plan.arms), list(plan.seeds), plan.budget_s, plan.eval_every_s, BASELINE, title)
    sigmas = heldout_levels(runs[plan.arms[0], plan.seeds[0]])
    samples = Samples(reference, plan.samples, plan.sample_steps, out / "samples", prompt=FACE_CAPTION)
    md, found = race_section(race, sigmas, out / "flow-speed", samples)
    atomic_write_text(out / "flow-speed-table.md", md)
    found = {"plan": asdict(plan), **results_json(race, sigmas, found), "wall_s": time.perf_counter() - started}
    write_json_atomic(out / "flow-speed-results.json", found)
    print("\n" + md, flush=True)
    return found


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--jobs", type=int, default=2, help="fine-tunes at once (one thread each)")
    ap.add_argument("--quick", action="store_true", help="tiny budgets: the wiring only")
    ap.add_argument("--pretrain-only", action="store_true",
                    help="stop after the base's pretraining and export (its steps, not its time, are fixed: it may "
                         "share the machine; the timed fine-tunes want it to themselves)")
    ap.add_argument("--run", help=argparse.SUPPRESS)  # one job, in its own process (what launch starts)
    args = ap.parse_args(argv)
    if args.run:
        run_one(json.loads(args.run))
        return
    if args.out is None:
        ap.error("--out is required")
    started, plan, out = time.perf_counter(), QUICK if args.quick else PLAN, args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    random_base = flow_base.random_base(out / "random-base")
    digits = flow_base.stores(out, random_base, DIGITS, every=25 if args.quick else 1)
    job = {"out": str(out / "base"), "stores": {k: str(v) for k, v in digits.items()}, "plan": asdict(plan),
           "random_base": str(random_base), "arm": "base", "seed": 0}
    launch([job], 1)
    base = flow_base.base_pipeline(out / "base", out / "base-pipeline")
    if args.pretrain_only:
        return
    faces = flow_base.stores(out, base, FACES)  # through the exported pipeline's encoders, as a user's data would be
    job["stores"] = {k: str(v) for k, v in faces.items()}
    runs = {(arm, seed): out / "runs" / arm.replace("/", "-") / f"seed{seed}" for seed in plan.seeds
            for arm in plan.arms}
    launch([{**job, "arm": arm, "seed": seed, "out": str(run), "base": str(base)}
            for (arm, seed), run in runs.items()], args.jobs)
    reference = write_faces(out / "images-faces-all", range(N_FACES), flow_base.SIDE)
    results(plan, out, runs, reference, started)


if __name__ == "__main__":
    main(sys.argv[1:])
