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
from dataclasses import asdict
from pathlib import Path

import torch

from .channel_runs import EXPERIMENTS, FinetunePlan, launch
from .dit_base import Pretraining, digit_stores, random_base, widened_copy
from .results import cpu_seconds, curve, plot, run_record, summarise

ARMS = EXPERIMENTS["dit"]

# Fixed before running (issue 33): about an hour of process CPU, one thread per run (the base ~40 min, each
# fine-tune ~3.5 min).
PRETRAINING = Pretraining(steps=6000, batch_size=32, lr=5e-4, eval_every=300)
FINETUNE = FinetunePlan(steps=800, batch_size=32, lr=3e-4, eval_every=100, heldout_limit=128)
SEEDS = (0, 1, 2)
QUICK = (Pretraining(steps=40, batch_size=8, lr=5e-4, eval_every=20),
         FinetunePlan(steps=20, batch_size=8, lr=3e-4, eval_every=10, heldout_limit=16))


def patch_embedding(net: torch.nn.Module) -> torch.nn.Module:
    return net.transformer.pos_embed.proj


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
    config = {"experiment": "dit", "stores": {k: str(v) for k, v in stores.items()}, "random_base": str(random_base(out / "random-base")),
              "pretraining": asdict(pretraining), "finetune": asdict(finetune)}
    launch([("base", 0, out / "base")], config, 1)
    config["bases"] = {"table": str(out / "base"), "channels": str(widened_copy(out / "base", out / "base-widened"))}
    jobs = [(arm, seed, out / "runs" / arm / f"seed{seed}") for seed in SEEDS for arm in ARMS]
    launch(jobs, config, args.jobs)
    runs = {arm: {seed: run_record(out / "runs" / arm / f"seed{seed}", patch_embedding) for seed in SEEDS}
            for arm in ARMS}
    base = curve(out / "base")
    results = {
        "command": "python -m benchmarks.finetune.dit_channels --out OUT --jobs 2" + (" --quick" if args.quick else ""),
        "arms": ARMS, "seeds": list(SEEDS), "pretraining": asdict(pretraining), "finetune": asdict(finetune),
        "base": {"curve": base, "best": min(p[1] for p in base), "cpu_s": cpu_seconds(out / "base")},
        "runs": runs, "summary": summarise(runs, "table", "channels"),
        "same_start": all(runs["table"][s]["curve"][0] == runs["channels"][s]["curve"][0] for s in SEEDS),
        "total_cpu_s": cpu_seconds(out / "base") + sum(r["cpu_s"] for by in runs.values() for r in by.values()),
    }
    (out / "dit-channels-results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out / "dit-channels-curves.png", "the base: pretraining on digits 0-4 (full size)",
         "fine-tuning on digits 5-9 (patches, aligned crops)", {"table": "tab:blue", "channels": "tab:orange"})
    sample_picture(out / "base", {arm: out / "runs" / arm / "seed0" for arm in ARMS},
                   out / "dit-channels-samples.png", 2)
    print(json.dumps(results["summary"], indent=1))
    print(f"same start: {results['same_start']}; total CPU {results['total_cpu_s']:.0f} s")


if __name__ == "__main__":
    main()
