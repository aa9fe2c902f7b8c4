"""One channels experiment end to end, the same for every base: the base's pretraining, its widened copy, the
fine-tunes of both arms over the seeds (channel_runs.py), and the results every table and figure is drawn from,
written as OUT/NAME-channels-results.json. What differs per base (its stores, its random pipeline, how it is
widened, which layer reads the coordinates) is given."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from .channel_runs import EXPERIMENTS, FinetunePlan, Pretraining, launch
from .results import cpu_seconds, curve, largest_gap, run_record, summarise


@dataclass(frozen=True)
class Plan:
    """Fixed before running."""

    experiment: str  # a key of EXPERIMENTS: "dit" or "sdxl"
    control: str  # the arm that stays stock; the other is "channels"
    pretraining: Pretraining
    finetune: FinetunePlan
    seeds: tuple[int, ...]


def arguments(doc: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--jobs", type=int, default=2, help="fine-tunes at once (one thread each)")
    ap.add_argument("--quick", action="store_true", help="tiny budgets: the wiring only")
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    return args


def run_experiment(plan: Plan, out: Path, random_base: Path, stores: dict[str, Path],
                   widen: Callable[[Path, Path], Path], layer: Callable[[torch.nn.Module], torch.nn.Module],
                   jobs: int, quick: bool) -> dict:
    """Pretrain the base, fine-tune both arms from it (`widen` makes the channels arm's start), and gather every
    run's record; the results are also written to OUT/NAME-channels-results.json."""
    arms = EXPERIMENTS[plan.experiment]
    config = {"experiment": plan.experiment, "stores": {k: str(v) for k, v in stores.items()},
              "random_base": str(random_base), "pretraining": asdict(plan.pretraining),
              "finetune": asdict(plan.finetune)}
    launch([("base", 0, out / "base")], config, 1)
    config["bases"] = {plan.control: str(out / "base"), "channels": str(widen(out / "base", out / "base-widened"))}
    launch([(arm, seed, out / "runs" / arm / f"seed{seed}") for seed in plan.seeds for arm in arms], config, jobs)
    runs = {arm: {seed: run_record(out / "runs" / arm / f"seed{seed}", layer) for seed in plan.seeds} for arm in arms}
    base = curve(out / "base")
    name = f"{plan.experiment}_channels"
    results = {
        "command": f"python -m benchmarks.finetune.{name} --out OUT --jobs 2" + (" --quick" if quick else ""),
        "arms": arms, "seeds": list(plan.seeds), "pretraining": asdict(plan.pretraining),
        "finetune": asdict(plan.finetune),
        "base": {"curve": base, "best": min(p[1] for p in base), "cpu_s": cpu_seconds(out / "base")},
        "runs": runs, "summary": summarise(runs, plan.control, "channels"),
        "largest_gap": largest_gap(runs, plan.control, "channels"),
        "same_start": all(runs[plan.control][s]["curve"][0] == runs["channels"][s]["curve"][0] for s in plan.seeds),
        "total_cpu_s": cpu_seconds(out / "base") + sum(r["cpu_s"] for by in runs.values() for r in by.values()),
    }
    (out / f"{plan.experiment}-channels-results.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def report(results: dict) -> None:
    print(json.dumps(results["summary"], indent=1))
    print(f"same start: {results['same_start']}; largest gap {results['largest_gap']:.2e}; "
          f"total CPU {results['total_cpu_s']:.0f} s")
