"""Step times, measured so that a shared machine cannot decide the comparison: each arm's step, per kind (patch
size, batch, routed or not), as process CPU time with one torch thread, in interleaved rounds of short real
training runs in one process; medians. Kept in OUT/step_times.json per arm, and the one cost per kind every
time axis of that --out uses in OUT/step_costs.json (report.settled_costs)."""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import torch

from latentpatch.data.store import LatentStore
from latentpatch.io import write_json_atomic
from latentpatch.patches import PatchSchedule
from latentpatch.training.results import StepInfo
from latentpatch.training.trainer import train

from . import report
from .arms import arm_config


def step_kinds(cfg, steps: int, latent: int) -> Iterator[report.StepKind]:
    """What each of the first `steps` steps is: the schedule's own draws, and whether routing is on (lazily:
    a plan reads only as many as its budget holds). A zoomed-out step is the kind of its shape: it costs what a
    crop of that shape costs."""
    zoom = LatentStore(cfg.patches.zoom_latents).latent_shape[1:] if cfg.patches.zoom_p > 0 else None
    schedule = PatchSchedule(cfg.patches, latent, latent, cfg.train.batch_size, multiple_of=2, seed=cfg.train.seed,
                             zoom_shape=zoom)
    routed = cfg.routing.share > 0
    for i in range(steps):
        stage = schedule.draw(i)
        yield stage.height, stage.width, stage.batch_size, routed


def measure_step_times(arms: list[str], data: dict, rounds: int, steps: int, regime: str) -> dict[str, dict]:
    """Median process CPU seconds per step kind of each arm: interleaved rounds of short real runs, 1 thread."""
    torch.set_num_threads(1)
    times: dict[str, dict[report.StepKind, list[float]]] = {arm: {} for arm in arms}
    for r in range(rounds):
        for arm in arms:
            cfg = arm_config(arm, seed=100 + r, data=data, eval_every=0, regime=regime)
            cfg.heldout.every, cfg.train.max_steps, cfg.train.log_every = 0, steps, 10**9
            last: list[float] = []

            def callback(info: StepInfo, routed=cfg.routing.share > 0, last=last, arm=arm) -> None:
                now = time.process_time()
                if last and info.step > 3:  # the first steps pay one-time costs
                    h, w = info.patch
                    times[arm].setdefault((h, w, info.batch_size, routed), []).append(now - last[0])
                last[:] = [time.process_time()]

            with tempfile.TemporaryDirectory() as tmp:
                train(cfg, data["train"], Path(tmp) / "run", device="cpu", progress=False, callback=callback)
        print(f"  step times: round {r + 1}/{rounds} done", flush=True)
    return {arm: {k: statistics.median(v) for k, v in by_kind.items()} for arm, by_kind in times.items()}


def as_rows(by_kind: dict) -> list:
    """A {step kind: seconds} table as JSON rows [[h, w, batch, routed], seconds]."""
    return [[list(k), v] for k, v in sorted(by_kind.items())]


def _kinds(rows: list) -> dict:
    return {tuple(k): v for k, v in rows}


def step_times(out: Path, arms: list[str], data: dict, rounds: int, steps: int, regime: str) -> dict[str, dict]:
    """OUT/step_times.json as {arm: {kind: seconds}}, after measuring the arms it lacks (all of them together)."""
    path = out / "step_times.json"
    saved = json.loads(path.read_text()) if path.is_file() else {}
    missing = [a for a in arms if a not in saved]
    if missing:
        measured = measure_step_times(missing, data, rounds, steps, regime)
        saved |= {arm: as_rows(by_kind) for arm, by_kind in measured.items()}
        write_json_atomic(path, saved)
    return {arm: _kinds(rows) for arm, rows in saved.items()}


def step_costs(out: Path, times: dict[str, dict]) -> dict[report.StepKind, float]:
    """The one cost per step kind of this --out: those OUT/step_costs.json already holds, the pool over the
    measured arms for the rest (then written there, so they do not move later)."""
    path = out / "step_costs.json"
    frozen = _kinds(json.loads(path.read_text())) if path.is_file() else {}
    seconds = report.settled_costs(frozen, times)
    if seconds != frozen:
        write_json_atomic(path, as_rows(seconds))
    return seconds


def describe(seconds: dict[report.StepKind, float]) -> str:
    return ", ".join(f"{h}x{w} b{b}{' routed' if r else ''} {v:.4f}" for (h, w, b, r), v in sorted(seconds.items()))
