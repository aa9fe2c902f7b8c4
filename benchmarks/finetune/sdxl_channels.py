"""Does an SDXL UNet need coordinate channels on its conv_in, or does its own micro-conditioning (the time ids
original_size, crops_coords_top_left, target_size, computed from the crop's coordinates) carry the crop's place?
(issue 33)

An SDXL base made here (sdxl_base.py: SDXL's UNet shape at three levels of 32/64/64 channels, text_time added
conditioning, two small CLIP towers, SDXL's scheduler and DDPM loss, the shipped VAE), pretrained by latentpatch on
captioned MNIST digits with the default patch schedule (the time ids telling each crop's place, as SDXL was
pretrained on crops), is fine-tuned on faces (another domain) with the default patch schedule, two ways from the
same weights: "time-ids" (the UNet stays stock) and "channels" (conv_in also reads two zero-initialised coordinate
channels, as SD 1.x/2.x UNets are fine-tuned). Same steps, settings and seeds; the trainer's own held-out loss (EMA,
8 fixed noise levels, held-out faces 80-99) every eval_every steps; each run in its own single-threaded process,
`--jobs` at once.

    python -m benchmarks.finetune.sdxl_channels --out sdxl-channels --jobs 2
    python -m benchmarks.finetune.sdxl_channels --out /tmp/sdxl-channels-quick --quick     # the wiring, minutes

Writes OUT/sdxl-channels-results.json, OUT/sdxl-channels-curves.png and OUT/sdxl-channels-samples.png
(docs/benchmarks.md, "SDXL bases: the time ids alone, or coordinate channels too").
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from pathlib import Path

import torch

from .channel_runs import EXPERIMENTS, FinetunePlan, launch
from .results import cpu_seconds, curve, largest_gap, plot, run_record, summarise
from .sdxl_base import FACE_CAPTION, Pretraining, random_base, stores, widened_copy

ARMS = EXPERIMENTS["sdxl"]
# Fixed before running (issue 33): about 40 minutes of process CPU, one thread per run (the base ~15 min at ~0.2 s
# a step, each fine-tune ~4 min).
PRETRAINING = Pretraining(steps=4000, batch_size=16, lr=5e-4, eval_every=500)
FINETUNE = FinetunePlan(steps=1000, batch_size=16, lr=2e-4, eval_every=100, heldout_limit=20)
SEEDS = (0, 1, 2)
QUICK = (Pretraining(steps=40, batch_size=8, lr=5e-4, eval_every=20),
         FinetunePlan(steps=20, batch_size=8, lr=2e-4, eval_every=10, heldout_limit=8))


def conv_in(net: torch.nn.Module) -> torch.nn.Module:
    return net.unet.conv_in


def sample_picture(base: Path, runs: dict[str, Path], path: Path, n: int) -> None:
    """A row per model, the same noise in each row: the base given "a handwritten digit 0".."9", each fine-tune
    given the face caption."""
    from torchvision.utils import save_image

    import latentpatch as lp

    settings = dict(guidance=3.0, seed=0, output="tensor", device="cpu")
    rows = [lp.sample(base, 1, prompts=[f"a handwritten digit {d}" for d in range(n)], **settings)]
    rows += [lp.sample(r, n, prompts=FACE_CAPTION, **settings) for r in runs.values()]
    save_image(torch.cat(rows), path, nrow=n, padding=1)


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
    base_folder = random_base(out / "random-base")
    data = stores(out, base_folder)
    config = {"experiment": "sdxl", "stores": {k: str(v) for k, v in data.items()}, "random_base": str(base_folder),
              "pretraining": asdict(pretraining), "finetune": asdict(finetune)}
    launch([("base", 0, out / "base")], config, 1)
    config["bases"] = {"time-ids": str(out / "base"), "channels": str(widened_copy(out / "base", out / "base-widened"))}
    jobs = [(arm, seed, out / "runs" / arm / f"seed{seed}") for seed in SEEDS for arm in ARMS]
    launch(jobs, config, args.jobs)
    runs = {arm: {seed: run_record(out / "runs" / arm / f"seed{seed}", conv_in) for seed in SEEDS} for arm in ARMS}
    base = curve(out / "base")
    results = {
        "command": "python -m benchmarks.finetune.sdxl_channels --out OUT --jobs 2" + (" --quick" if args.quick else ""),
        "arms": ARMS, "seeds": list(SEEDS), "pretraining": asdict(pretraining), "finetune": asdict(finetune),
        "base": {"curve": base, "best": min(p[1] for p in base), "cpu_s": cpu_seconds(out / "base")},
        "runs": runs, "summary": summarise(runs, "time-ids", "channels"),
        "largest_gap": largest_gap(runs, "time-ids", "channels"),
        "same_start": all(runs["time-ids"][s]["curve"][0] == runs["channels"][s]["curve"][0] for s in SEEDS),
        "total_cpu_s": cpu_seconds(out / "base") + sum(r["cpu_s"] for by in runs.values() for r in by.values()),
    }
    (out / "sdxl-channels-results.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(results, out / "sdxl-channels-curves.png", "the base: pretraining on digits (patches, time ids)",
         "fine-tuning on faces (patches)", {"time-ids": "tab:blue", "channels": "tab:orange"})
    sample_picture(out / "base", {arm: out / "runs" / arm / "seed0" for arm in ARMS},
                   out / "sdxl-channels-samples.png", 8)
    print(json.dumps(results["summary"], indent=1))
    print(f"same start: {results['same_start']}; largest gap {results['largest_gap']:.2e}; "
          f"total CPU {results['total_cpu_s']:.0f} s")


if __name__ == "__main__":
    main()
