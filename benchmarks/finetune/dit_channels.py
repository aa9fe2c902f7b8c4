"""Does a pretrained DiT need coordinate channels on its patch embedding, or is its sin-cos position table,
computed from the crop's coordinates, enough? (issue 33)

A DiT base made here (dit_base.py: DiT-XL/2's configuration at 4 blocks x 128, patch 2, class-conditional with a
null class, the DDIM scheduler, pretrained by latentpatch on MNIST digits 0-4 at 64 px, full size only) is
fine-tuned on digits 5-9 with the library's default patch schedule and aligned crops, two ways from the same
weights: "table" (the DiT stays stock, the crop's place only in its position table) and "channels" (the patch
embedding also reads two zero-initialised coordinate channels, as DiT bases were fine-tuned before). Same steps,
settings and seeds; the trainer's own held-out loss (EMA, 8 fixed noise levels, the held-out digits 5-9) every
eval_every steps; each run in its own single-threaded process, `--jobs` at once.

    python -m benchmarks.finetune.dit_channels --out dit-channels --jobs 2
    python -m benchmarks.finetune.dit_channels --out /tmp/dit-channels-quick --quick     # the wiring, minutes

Writes OUT/dit-channels-results.json, OUT/dit-channels-curves.png and OUT/dit-channels-samples.png
(docs/benchmarks.md, "DiT bases: the position table alone, or coordinate channels too").
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import asdict
from pathlib import Path

import torch

from latentpatch.training.logging import read_log

from .channel_runs import ARMS, FinetunePlan, launch
from .dit_base import Pretraining, digit_stores, random_base, widened_copy

# Fixed before running (issue 33): about an hour of process CPU, one thread per run (the base ~40 min, each
# fine-tune ~3.5 min).
PRETRAINING = Pretraining(steps=6000, batch_size=32, lr=5e-4, eval_every=300)
FINETUNE = FinetunePlan(steps=800, batch_size=32, lr=3e-4, eval_every=100, heldout_limit=128)
SEEDS = (0, 1, 2)
QUICK = (Pretraining(steps=40, batch_size=8, lr=5e-4, eval_every=20),
         FinetunePlan(steps=20, batch_size=8, lr=3e-4, eval_every=10, heldout_limit=16))


def curve(run: Path) -> list[list[float]]:
    """[step, held-out loss] of each evaluation of a run, in order."""
    return [[r["step"], r["heldout_loss"]] for r in read_log(run / "log.jsonl") if "heldout_loss" in r]


def cpu_seconds(run: Path) -> float:
    return json.loads((run / "cpu.json").read_text())["process_cpu_s"]


def coordinate_weight_share(run: Path) -> float | None:
    """|W_coords| / |W_latent| of the fine-tuned patch embedding (EMA): how much the channels came to be used."""
    from latentpatch.runs import load_run

    net = load_run(run, checkpoint="latest").precond.net
    if not net.coordinate_inputs:
        return None
    w = net.transformer.pos_embed.proj.weight
    return float(w[:, net.latent_channels:].norm() / w[:, :net.latent_channels].norm())


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def summarise(runs: dict[str, dict[int, dict]]) -> dict:
    """Per arm: best and final held-out loss over seeds; paired by seed: channels - table."""
    out = {}
    for arm, by_seed in runs.items():
        out[arm] = {k: spread([r[k] for r in by_seed.values()]) for k in ("best", "final")}
    seeds = sorted(runs["table"])
    out["channels_minus_table"] = {k: {"per_seed": [runs["channels"][s][k] - runs["table"][s][k] for s in seeds]}
                                   for k in ("best", "final")}
    for k, d in out["channels_minus_table"].items():
        d.update(spread(d["per_seed"]))
    return out


def run_record(run: Path) -> dict:
    points = curve(run)
    best = min(points, key=lambda p: p[1])
    return {"curve": points, "best": best[1], "best_step": best[0], "final": points[-1][1],
            "cpu_s": cpu_seconds(run), "coordinate_weight_share": coordinate_weight_share(run)}


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    base = results["base"]["curve"]
    ax0.plot([p[0] for p in base], [p[1] for p in base], "k.-")
    ax0.set(title="the base: pretraining on digits 0-4 (full size)", xlabel="step", ylabel="held-out loss (digits 0-4)")
    colours = {"table": "tab:blue", "channels": "tab:orange"}
    for arm, by_seed in results["runs"].items():
        for i, (seed, r) in enumerate(sorted(by_seed.items())):
            ax1.plot([p[0] for p in r["curve"]], [p[1] for p in r["curve"]], color=colours[arm], alpha=0.8,
                     lw=1, label=f"{arm} ({len(by_seed)} seeds)" if i == 0 else None)
    ax1.set(title="fine-tuning on digits 5-9 (patches, aligned crops)", xlabel="step",
            ylabel="held-out loss (digits 5-9)")
    ax1.set_ylim(top=min(ax1.get_ylim()[1], 1.5 * results["summary"]["table"]["final"]["max"]))
    ax1.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def sample_picture(base: Path, runs: dict[str, Path], path: Path, per_class: int) -> None:
    """A row per model (the base: its classes are digits 0-4; the fine-tunes: 5-9), the same noise in each row."""
    from torchvision.utils import save_image

    import latentpatch as lp

    rows = [lp.sample(r, per_class, class_labels=list(range(5)), guidance=2.0, seed=0, output="tensor",
                      device="cpu") for r in [base, *runs.values()]]
    save_image(torch.cat(rows), path, nrow=5 * per_class, padding=1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--jobs", type=int, default=2, help="fine-tunes at once (one thread each)")
    ap.add_argument("--quick", action="store_true", help="tiny budgets: the wiring only")
    args = ap.parse_args()
    torch.set_num_threads(1)
    pretraining, finetune = QUICK if args.quick else (PRETRAINING, FINETUNE)
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    stores = digit_stores(out)
    config = {"stores": {k: str(v) for k, v in stores.items()}, "random_base": str(random_base(out / "random-base")),
              "pretraining": asdict(pretraining), "finetune": asdict(finetune)}
    launch([("base", 0, out / "base")], config, 1)
    config["bases"] = {"table": str(out / "base"), "channels": str(widened_copy(out / "base", out / "base-widened"))}
    jobs = [(arm, seed, out / "runs" / arm / f"seed{seed}") for seed in SEEDS for arm in ARMS]
    launch(jobs, config, args.jobs)
    runs = {arm: {seed: run_record(out / "runs" / arm / f"seed{seed}") for seed in SEEDS} for arm in ARMS}
    base = curve(out / "base")
    results = {
        "command": "python -m benchmarks.finetune.dit_channels --out OUT --jobs 2" + (" --quick" if args.quick else ""),
        "arms": ARMS, "seeds": list(SEEDS), "pretraining": asdict(pretraining), "finetune": asdict(finetune),
        "base": {"curve": base, "best": min(p[1] for p in base), "cpu_s": cpu_seconds(out / "base")},
        "runs": runs, "summary": summarise(runs),
        "same_start": all(runs["table"][s]["curve"][0] == runs["channels"][s]["curve"][0] for s in SEEDS),
        "total_cpu_s": cpu_seconds(out / "base") + sum(r["cpu_s"] for by in runs.values() for r in by.values()),
    }
    (out / "dit-channels-results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out / "dit-channels-curves.png")
    sample_picture(out / "base", {arm: out / "runs" / arm / "seed0" for arm in ARMS},
                   out / "dit-channels-samples.png", 2)
    print(json.dumps(results["summary"], indent=1))
    print(f"same start: {results['same_start']}; total CPU {results['total_cpu_s']:.0f} s")


if __name__ == "__main__":
    main()
