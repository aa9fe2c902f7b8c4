"""Training each (arm, seed) for the steps its budget holds, and reading its held-out curves back.

Each run trains in its own process with one thread; steps and losses do not depend on the machine's load, and
its time axis is the cumulative measured cost of the steps its schedule drew (timing.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from latentpatch.checkpoints import latest_checkpoint, read_state
from latentpatch.config import config_to_dict
from latentpatch.diffusion.edm import heldout_sigma_grid
from latentpatch.training.logging import read_log

from . import report
from .arms import arm_config
from .data import REGIMES
from .renames import folder_name
from .timing import step_kinds


@dataclass
class Plan:
    """One (arm, seed): its config, the steps the budget holds, and t[s] = training seconds after s steps."""

    cfg: object
    steps: int
    times: list[float]


def plan_run(arm: str, seed: int, data: dict, eval_every: int, seconds: dict, budget_s: float, regime: str) -> Plan:
    """The steps the budget holds under the arm's own schedule draws, and their cumulative seconds."""
    cfg = arm_config(arm, seed, data, eval_every, regime)
    latent = REGIMES[regime].latent
    steps = report.steps_within(step_kinds(cfg, 10**6, latent), seconds, budget_s)
    return Plan(cfg, steps, report.cumulative_seconds(list(step_kinds(cfg, steps, latent)), seconds))


def run_training(arm: str, seed: int, plan: Plan, data: dict, out: Path) -> Path:
    """One (arm, seed) in its own process with one thread; resumes a killed run, skips a finished one."""
    run = out / "runs" / folder_name(arm) / f"seed{seed}"
    found = latest_checkpoint(run)
    if found is not None and int(read_state(found)["step"]) >= plan.steps:
        return run
    plan.cfg.train.ckpt_every = 1000
    config = out / "configs" / f"{folder_name(arm)}-seed{seed}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    import yaml

    config.write_text(yaml.safe_dump(config_to_dict(plan.cfg), sort_keys=False))
    cmd = [sys.executable, "-m", "latentpatch.cli", "train", "--latents", str(data["train"]), "--out", str(run),
           "--device", "cpu", "--no-progress", "--max-steps", str(plan.steps)]
    cmd += ["--resume"] if found is not None else ["--config", str(config)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{arm} seed {seed} failed:\n{proc.stderr[-3000:]}")
    print(f"  trained {arm} seed {seed}: {plan.steps} steps in {time.perf_counter() - t0:.0f} s wall", flush=True)
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
