"""Aspect buckets against centre cropping (issue 23), on a mixed-shape set (data.py), at 64 px area
through the shipped VAE (builtin, factor 4; buckets step 8 px = 2 latent pixels, the DiT patch):

  1. kept share: the share of each image's pixels that reaches the store, centre-cropped to 64x64 vs bucketed;
  2. throughput: training steps on the bucketed store against the centre-cropped store of the same area (the
     demo's DiT and default patch schedule), process CPU time per step with one torch thread, interleaved rounds;
  3. quality: the same model trained on each store for the same process CPU seconds (one thread each, the two
     runs at once), both scored on the bucketed held-out images at their own shapes (held-out loss per bucket),
     and samples at three aspect ratios from each (a picture with a row per shape and model).

    python -m benchmarks.shapes.aspect_buckets --out aspect --budget-s 600
    python -m benchmarks.shapes.aspect_buckets --out /tmp/aspect --quick     # the wiring only, a few minutes
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from latentpatch.data.store import LatentStore
from latentpatch.training.logging import read_log

from .data import write_mixed_shapes
from .runs import ARMS, step_times, train_arms
from .scoring import sample_picture, score_per_bucket
from .stores import copy_split, encode_stores, kept_shares


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--budget-s", type=float, default=600.0, help="process CPU seconds of training per store")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--jobs", type=int, default=3, help="training processes at once (one thread each)")
    ap.add_argument("--arms", default=",".join(ARMS), help="which arms to train and score")
    ap.add_argument("--no-timing", dest="timing", action="store_false", help="skip the throughput rounds")
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--samples", type=int, default=8, help="samples per shape and model in the picture")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    images = copy_split(write_mixed_shapes(args.out / "mixed"), args.out)
    stores = encode_stores(args.out, images)
    results = {"kept_share": kept_shares(stores["buckets-train"]),
               "buckets": [{"size": list(b), "items": n} for b, n in
                           zip(LatentStore(stores["buckets-train"]).buckets, LatentStore(stores["buckets-train"]).bucket_counts)]}
    if args.timing:
        timing = step_times(stores, args.out, rounds=1 if args.quick else 3, steps=10 if args.quick else 60)
        results["throughput"] = timing
        results["throughput_ratio"] = timing["buckets"]["latent_px_per_s"] / timing["centre-crop"]["latent_px_per_s"]
    name = f"aspect-results-seed{args.seed}.json"
    (args.out / name).write_text(json.dumps(results, indent=1))
    budget = 20.0 if args.quick else args.budget_s
    runs = train_arms(stores, args.out, budget, args.seed, 20 if args.quick else args.eval_every, args.jobs,
                      args.arms.split(","))
    results["budget_s"], results["seed"] = budget, args.seed
    results["steps"] = {arm: max(r["step"] for r in read_log(run / "log.jsonl")) for arm, run in runs.items()}
    results["heldout"] = score_per_bucket(runs, stores["buckets-heldout"])
    (args.out / name).write_text(json.dumps(results, indent=1))
    sample_picture(runs, args.out / f"aspect-samples-seed{args.seed}.png", 3 if args.quick else args.samples)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
