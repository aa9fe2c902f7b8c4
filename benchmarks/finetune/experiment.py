"""One channels experiment end to end, the same for every base: the base's pretraining, its widened copy, the
fine-tunes of both arms over the seeds (channel_runs.py), and the results every table and figure is drawn from,
written as OUT/NAME-channels-results.json. What differs per base (its stores, its random pipeline, which layer
would read the coordinates) is given."""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .channel_runs import EXPERIMENTS, FinetunePlan, Pretraining, launch
from .results import cpu_seconds, curve, largest_gap, run_record, summarise


@dataclass(frozen=True)
class Plan:
    """Fixed before running."""

    experiment: str  # a key of EXPERIMENTS: "dit" or "sdxl"
    control: str  # the arm that stays stock; the other is "channels"
    first_layer: str  # the state key of the conv weight the channels arm widens (the network's first layer)
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


def widened_copy(base: Path, out: Path, weight: str) -> Path:
    """`base` (a run) with its first layer (the conv whose state key is `weight`) reading the two coordinate
    channels too, with zero weights (CoordinateConv2d.widen: the same function), in_channels C+2 in the network's
    config: a run folder at the base's step, which the channels arm fine-tunes. A DiT so widened takes the path of
    the runs fine-tuned with channels before (they still load); an SDXL UNet, models/sdxl.py's widened form."""
    from latentpatch.checkpoints import save_checkpoint
    from latentpatch.config import load_saved_config, save_config
    from latentpatch.denoiser import build_precond
    from latentpatch.models.widen import COORD_CHANNELS, CoordinateConv2d
    from latentpatch.runs import load_run

    if (out / "done").is_file():
        return out
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    loaded = load_run(base, weights="ema")  # the checkpoint a fine-tune of `base` starts from (BEST)
    cfg = load_saved_config(base / "config.yaml")
    latent_channels = int(loaded.info["latent_shape"][0])
    cfg.model.pretrained.config = {**cfg.model.pretrained.config, "in_channels": latent_channels + COORD_CHANNELS}
    save_config(cfg, out / "config.yaml")
    shutil.copyfile(base / "run.json", out / "run.json")
    state = {k: v.clone() for k, v in loaded.precond.state_dict().items()}
    w = state[weight]
    conv = torch.nn.Conv2d(w.shape[1], w.shape[0], w.shape[2:], bias=False)
    conv.weight.data.copy_(w)
    state[weight] = CoordinateConv2d.widen(conv).weight.detach().clone()
    widened = build_precond(cfg, latent_channels, device="cpu", init_state=state)
    save_checkpoint(out, loaded.step, widened, widened, torch.optim.AdamW(widened.parameters()), {"nimg": 0})
    (out / "widened.json").write_text(json.dumps({"from": base.name, "step": loaded.step}) + "\n")
    (out / "done").write_text("")
    return out


def run_experiment(plan: Plan, out: Path, random_base: Path, stores: dict[str, Path], jobs: int, quick: bool) -> dict:
    """Pretrain the base, fine-tune both arms from it, and gather every run's record; the results are also written
    to OUT/NAME-channels-results.json."""
    arms = EXPERIMENTS[plan.experiment]
    config = {"experiment": plan.experiment, "stores": {k: str(v) for k, v in stores.items()},
              "random_base": str(random_base), "pretraining": asdict(plan.pretraining),
              "finetune": asdict(plan.finetune)}
    launch([("base", 0, out / "base")], config, 1)
    widened = widened_copy(out / "base", out / "base-widened", plan.first_layer)
    config["bases"] = {plan.control: str(out / "base"), "channels": str(widened)}
    launch([(arm, seed, out / "runs" / arm / f"seed{seed}") for seed in plan.seeds for arm in arms], config, jobs)
    runs = {arm: {seed: run_record(out / "runs" / arm / f"seed{seed}", plan.first_layer) for seed in plan.seeds}
            for arm in arms}
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
