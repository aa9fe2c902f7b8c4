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

from pathlib import Path

import torch

from .channel_runs import FinetunePlan, Pretraining
from .experiment import Plan, arguments, report, run_experiment
from .results import plot
from .captioned import FACE_CAPTION
from .sdxl_base import random_base, stores

# Fixed before running (issue 33): about 40 minutes of process CPU, one thread per run (the base ~15 min at ~0.2 s
# a step, each fine-tune ~4 min).
PLAN = Plan("sdxl", "time-ids", "net.unet.conv_in.weight",
            Pretraining(steps=4000, batch_size=16, lr=5e-4, eval_every=500),
            FinetunePlan(steps=1000, batch_size=16, lr=2e-4, eval_every=100, heldout_limit=20), seeds=(0, 1, 2))
QUICK = Plan("sdxl", "time-ids", "net.unet.conv_in.weight",
            Pretraining(steps=40, batch_size=8, lr=5e-4, eval_every=20),
             FinetunePlan(steps=20, batch_size=8, lr=2e-4, eval_every=10, heldout_limit=8), seeds=(0, 1, 2))



def sample_picture(base: Path, runs: dict[str, Path], path: Path, n: int) -> None:
    """A row per model, the same noise in each row: the base given "a handwritten digit 0" to n - 1, each fine-tune
    given the face caption."""
    from torchvision.utils import save_image

    import latentpatch as lp

    settings = dict(guidance=3.0, seed=0, output="tensor", device="cpu")
    rows = [lp.sample(base, 1, prompts=[f"a handwritten digit {d}" for d in range(n)], **settings)]
    rows += [lp.sample(r, n, prompts=FACE_CAPTION, **settings) for r in runs.values()]
    save_image(torch.cat(rows), path, nrow=n, padding=1)


def main() -> None:
    args = arguments(__doc__)
    plan, out = QUICK if args.quick else PLAN, args.out
    base = random_base(out / "random-base")
    results = run_experiment(plan, out, base, stores(out, base), args.jobs, args.quick)
    plot(results, out / "sdxl-channels-curves.png", "the base: pretraining on digits (patches, time ids)",
         "fine-tuning on faces (patches)", {"time-ids": "tab:blue", "channels": "tab:orange"})
    sample_picture(out / "base", {arm: out / "runs" / arm / "seed0" for arm in results["arms"]},
                   out / "sdxl-channels-samples.png", 8)
    report(results)


if __name__ == "__main__":
    main()
