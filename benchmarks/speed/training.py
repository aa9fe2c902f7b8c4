"""Training each (arm, seed) for a budget of its own measured training time, and reading its curves back.

Each run trains in its own process with one torch thread (timed_run.py): the trainer's clock (process CPU seconds
of the optimisation steps) decides when it is evaluated (every --eval-every-s) and when it stops (--budget-s), and
is logged as `train_s` in every record. The time axis of every curve is that logged time: the run's own.
"""

from __future__ import annotations

from pathlib import Path

from latentpatch.config import config_to_dict
from latentpatch.diffusion.edm import heldout_sigma_grid
from latentpatch.training.logging import read_log

from ..one_thread import run_python
from .arms import arm_config
from .renames import folder_name

NO_STEP_EVALUATIONS = 10**9  # heldout.every: the run evaluates when its time grid asks (and at steps 0 and last)


def run_config(arm: str, seed: int, data: dict, regime: str, snapshot_every: int, heldout_limit: int | None):
    """The arm's config for a run evaluated on a grid of training time, not of steps."""
    return arm_config(arm, seed, data, snapshot_every, regime, heldout_every=NO_STEP_EVALUATIONS,
                      heldout_limit=heldout_limit)


def run_training(arm: str, seed: int, cfg, data: dict, out: Path, budget_s: float, eval_every_s: float) -> Path:
    """One (arm, seed) in its own process with one thread; resumes a killed run, skips a finished one."""
    import yaml

    run = out / "runs" / folder_name(arm) / f"seed{seed}"
    cfg.train.ckpt_every = 1000
    config = out / "configs" / f"{folder_name(arm)}-seed{seed}.yaml"
    config.parent.mkdir(parents=True, exist_ok=True)
    config.write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False))
    run_python(["-m", "benchmarks.speed.timed_run", str(config), str(data["train"]), str(run),
                "--budget-s", str(budget_s), "--eval-every-s", str(eval_every_s)], f"{arm} seed {seed}")
    return run


def within_budget(records: list[dict], budget_s: float) -> list[dict]:
    """The records of one run up to its first at or past `budget_s` training seconds (a run trained for a longer
    budget serves a shorter one: its clock and grid are the same up to there); a step logged twice (a resume
    repeats the steps after its checkpoint) counts once, as last logged."""
    by_step: dict[int, dict] = {}
    for r in records:
        by_step[r["step"]] = r
    out = []
    for r in sorted(by_step.values(), key=lambda r: r["train_s"]):
        out.append(r)
        if r["train_s"] >= budget_s:
            break
    return out


def heldout_records(run: Path, budget_s: float) -> list[dict]:
    return within_budget([r for r in read_log(run / "log.jsonl") if "heldout_loss" in r], budget_s)


def heldout_curve(run: Path, budget_s: float) -> list[tuple[float, float]]:
    """(the run's own training seconds, held-out loss averaged over the noise levels)."""
    return [(r["train_s"], r["heldout_loss"]) for r in heldout_records(run, budget_s)]


def sigma_curves(run: Path, budget_s: float) -> list[tuple[float, list[float]]]:
    """(the run's own training seconds, held-out loss at each noise level of the fixed grid, ascending)."""
    return [(r["train_s"], r["heldout_per_sigma"]) for r in heldout_records(run, budget_s)]


def steps_taken(run: Path, budget_s: float) -> int:
    records = heldout_records(run, budget_s)
    return records[-1]["step"] if records else 0


def seconds_of_steps(run: Path) -> dict[int, float]:
    """{step: training seconds} of every logged step (post-hoc snapshots fall on logged steps)."""
    return {r["step"]: r["train_s"] for r in read_log(run / "log.jsonl") if "train_s" in r}


def heldout_sigmas(cfg) -> list[float]:
    """The fixed held-out noise levels every arm is scored at (one grid: the arms share COMMON's edm and heldout)."""
    return [float(s) for s in heldout_sigma_grid(cfg.heldout.sigmas, cfg.edm.P_mean, cfg.edm.P_std)]
