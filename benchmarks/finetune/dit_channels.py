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

from pathlib import Path

import torch

from .channel_runs import FinetunePlan, Pretraining
from .dit_base import digit_stores, random_base
from .experiment import Plan, arguments, report, run_experiment
from .results import plot

# Fixed before running (issue 33): about an hour of process CPU, one thread per run (the base ~40 min, each
# fine-tune ~3.5 min).
PLAN = Plan("dit", "table", "net.transformer.pos_embed.proj.weight",
            Pretraining(steps=6000, batch_size=32, lr=5e-4, eval_every=300),
            FinetunePlan(steps=800, batch_size=32, lr=3e-4, eval_every=100, heldout_limit=128), seeds=(0, 1, 2))
QUICK = Plan("dit", "table", "net.transformer.pos_embed.proj.weight",
            Pretraining(steps=40, batch_size=8, lr=5e-4, eval_every=20),
             FinetunePlan(steps=20, batch_size=8, lr=3e-4, eval_every=10, heldout_limit=16), seeds=(0, 1, 2))



def sample_picture(base: Path, runs: dict[str, Path], path: Path, per_class: int) -> None:
    """A row per model (the base: its classes are digits 0-4; the fine-tunes: 5-9), the same noise in each row."""
    from torchvision.utils import save_image

    import latentpatch as lp

    rows = [lp.sample(r, per_class, class_labels=list(range(5)), guidance=2.0, seed=0, output="tensor",
                      device="cpu") for r in [base, *runs.values()]]
    save_image(torch.cat(rows), path, nrow=5 * per_class, padding=1)


def main() -> None:
    args = arguments(__doc__)
    plan, out = QUICK if args.quick else PLAN, args.out
    stores = digit_stores(out)
    results = run_experiment(plan, out, random_base(out / "random-base"), stores, args.jobs, args.quick)
    plot(results, out / "dit-channels-curves.png", "the base: pretraining on digits 0-4 (full size)",
         "fine-tuning on digits 5-9 (patches, aligned crops)", {"table": "tab:blue", "channels": "tab:orange"})
    sample_picture(out / "base", {arm: out / "runs" / arm / "seed0" for arm in results["arms"]},
                   out / "dit-channels-samples.png", 2)
    report(results)


if __name__ == "__main__":
    main()
