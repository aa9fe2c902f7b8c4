"""The arms of the aspect-bucket measurements and their training: throughput in interleaved rounds, and each arm
trained for the same process CPU seconds in its own single-threaded process."""

from __future__ import annotations

import shutil
import statistics
import time
from pathlib import Path

import torch

import latentpatch as lp

from ..one_thread import run_python, side_by_side
from ..speed.arms import ARMS as SPEED_ARMS, COMMON

ARMS = {  # arm: (its stores' kind, config overrides)
    "buckets": ("buckets", []),  # per-axis coordinates, the library's default
    "buckets/longer-side": ("buckets", ["patches.coordinate_scale=longer-side"]),
    "centre-crop": ("square", []),
}
TIMED = ("buckets", "centre-crop")  # the throughput comparison


def run_config(heldout: Path, seed: int, extra: list[str]):
    """The demo's DiT and the library's default patch schedule (speed to quality's COMMON + half-crops)."""
    return lp.load_config(None, COMMON + SPEED_ARMS["half-crops"] + [
        f"train.seed={seed}", f"heldout.latents={heldout}", "train.max_steps=1000000"] + extra)


def step_times(stores: dict[str, Path], root: Path, rounds: int, steps: int) -> dict[str, dict[str, float]]:
    """Each arm's training throughput, one thread, in interleaved rounds of short real runs: latent pixels per
    process CPU second (a bucket's full-size step holds a little less than the square's area) and the median
    step; the first 3 steps of each run are not counted (one-time costs)."""
    times: dict[str, list[tuple[float, int]]] = {arm: [] for arm in TIMED}
    for r in range(rounds):
        for arm in TIMED:
            kind = ARMS[arm][0]
            out = root / f"timing-{arm}-{r}"
            shutil.rmtree(out, ignore_errors=True)
            cfg = run_config(stores[f"{kind}-heldout"], 100 + r, ["heldout.every=0", "heldout.latents=null",
                                                                  "heldout.share=0", "train.log_every=1000000"])
            cfg.train.max_steps = steps
            last: list[float] = []

            def callback(info, arm=arm, last=last) -> None:
                now = time.process_time()
                if last and info.step > 3:
                    times[arm].append((now - last[0], info.patch[0] * info.patch[1] * info.batch_size))
                last[:] = [now]

            lp.train(cfg, stores[f"{kind}-train"], out, device="cpu", progress=False, callback=callback)
            shutil.rmtree(out, ignore_errors=True)
    return {arm: {"median_step_s": statistics.median(t for t, _ in v),
                  "latent_px_per_s": sum(p for _, p in v) / sum(t for t, _ in v)} for arm, v in times.items()}


def train_one(arm: str, store: Path, heldout: Path, out: Path, budget_s: float, seed: int, eval_every: int) -> None:
    """One arm trained for `budget_s` process CPU seconds with one thread (the caller runs it in its own process)."""
    torch.set_num_threads(1)
    cfg = run_config(heldout, seed, [f"heldout.every={eval_every}"] + ARMS[arm][1])
    start = time.process_time()
    lp.train(cfg, store, out, device="cpu", progress=False,
             callback=lambda info: time.process_time() - start >= budget_s)


def train_arms(stores: dict[str, Path], root: Path, budget_s: float, seed: int, eval_every: int,
               jobs: int, arms: list[str]) -> dict[str, Path]:
    """The arms, `jobs` at once, each in its own single-threaded process (a finished run is kept)."""
    runs = {arm: root / f"run-{arm.replace('/', '-')}-{budget_s:g}s-seed{seed}" for arm in arms}

    def launch(arm: str) -> None:
        if (runs[arm] / "done").is_file():
            return
        shutil.rmtree(runs[arm], ignore_errors=True)
        kind = ARMS[arm][0]
        code = ("import sys; from benchmarks.shapes.runs import train_one; from pathlib import Path; "
                "train_one(sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4]), float(sys.argv[5]), "
                "int(sys.argv[6]), int(sys.argv[7]))")
        run_python(["-c", code, arm, str(stores[f"{kind}-train"]), str(stores[f"{kind}-heldout"]), str(runs[arm]),
                    str(budget_s), str(seed), str(eval_every)], f"{arm} seed {seed}", capture=False)
        (runs[arm] / "done").write_text("")

    side_by_side(launch, arms, jobs)
    return runs
