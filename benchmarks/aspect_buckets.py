"""Aspect buckets against centre cropping (issue 23), on a mixed-shape set (aspect_data.py), at 64 px area
through the shipped VAE (builtin, factor 4; buckets step 8 px = 2 latent pixels, the DiT patch):

  1. kept share: the share of each image's pixels that reaches the store, centre-cropped to 64x64 vs bucketed;
  2. throughput: training steps on the bucketed store against the centre-cropped store of the same area (the
     demo's DiT and default patch schedule), process CPU time per step with one torch thread, interleaved rounds;
  3. quality: the same model trained on each store for the same process CPU seconds (one thread each, the two
     runs at once), both scored on the bucketed held-out images at their own shapes (held-out loss per bucket),
     and samples at three aspect ratios from each (a picture with a row per shape and model).

    python benchmarks/aspect_buckets.py --out aspect --budget-s 600
    python benchmarks/aspect_buckets.py --out /tmp/aspect --quick     # the wiring only, a few minutes
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

import latentpatch as lp
from aspect_data import split, write_mixed_shapes
from latentpatch.data.buckets import kept_share
from latentpatch.data.store import LatentStore

SIDE = 64  # pixels: the square of the bucket area
ARMS = {"buckets": "buckets", "centre-crop": "square"}  # arm: its stores' kind
SHAPES = {"portrait 48x80": (80, 48), "square 64x64": (64, 64), "landscape 80x48": (48, 80)}  # name (W x H): (H, W)


def run_config(heldout: Path, seed: int, extra: list[str]):
    """The demo's DiT and the library's default patch schedule (speed_to_quality's COMMON + paper+sigma)."""
    from speed_to_quality import ARMS as STQ_ARMS, COMMON

    return lp.load_config(None, COMMON + STQ_ARMS["paper+sigma"] + [
        f"train.seed={seed}", f"heldout.latents={heldout}", "train.max_steps=1000000"] + extra)


def copy_split(src: Path, root: Path) -> dict[str, Path]:
    """images-train/ and images-heldout/ (the held-out tenth), keeping the kind subfolders."""
    train, held = split(src)
    out = {}
    for part, files in (("train", train), ("heldout", held)):
        folder = root / f"images-{part}"
        for f in files:
            dst = folder / f.relative_to(src)
            if not dst.is_file():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, dst)
        out[part] = folder
    return out


def encode_stores(root: Path, images: dict[str, Path]) -> dict[str, Path]:
    """{buckets,square}-{train,heldout} stores (a rerun finds them up to date)."""
    stores = {}
    for kind, opts in (("buckets", dict(buckets=True)), ("square", {})):
        for part, folder in images.items():
            stores[f"{kind}-{part}"] = root / f"store-{kind}-{part}"
            lp.encode(folder, stores[f"{kind}-{part}"], "builtin", SIDE, device="cpu", workers=0, **opts)
    return stores


def kept_shares(store: Path) -> dict[str, float]:
    """Mean, minimum and per-kind mean kept share of a bucketed store's items, bucketed and centre-cropped."""
    m = LatentStore(store).manifest
    rows = [(i.file.split("/")[0], kept_share(*i.image_size, m.buckets[i.bucket]), kept_share(*i.image_size, (SIDE, SIDE)))
            for i in m.items]
    out = {}
    for name, pick in (("buckets", 1), ("centre-crop", 2)):
        values = [r[pick] for r in rows]
        out[name] = {"mean": statistics.mean(values), "min": min(values),
                     **{kind: statistics.mean(r[pick] for r in rows if r[0] == kind) for kind in sorted({r[0] for r in rows})}}
    return out


def step_times(stores: dict[str, Path], root: Path, rounds: int, steps: int) -> dict[str, dict[str, float]]:
    """Each arm's training throughput, one thread, in interleaved rounds of short real runs: latent pixels per
    process CPU second (a bucket's full-size step holds a little less than the square's area) and the median
    step; the first 3 steps of each run are not counted (one-time costs)."""
    times: dict[str, list[tuple[float, int]]] = {arm: [] for arm in ARMS}
    for r in range(rounds):
        for arm, kind in ARMS.items():
            out = root / f"timing-{arm}-{r}"
            shutil.rmtree(out, ignore_errors=True)
            cfg = run_config(stores[f"{kind}-heldout"], 100 + r, ["heldout.every=0", "heldout.latents=null",
                                                                  "heldout.share=0", "train.log_every=1000000"])
            cfg.train.max_steps = steps
            last: list[float] = []

            def callback(info, arm=arm, last=last) -> None:
                now = time.process_time()
                if last and info.step > 3:
                    times[arm].append((now - last[0], info.patch[0] * info.patch[1] * info.batch_size))
                last[:] = [now]

            lp.train(cfg, stores[f"{kind}-train"], out, device="cpu", progress=False, callback=callback)
            shutil.rmtree(out, ignore_errors=True)
    return {arm: {"median_step_s": statistics.median(t for t, _ in v),
                  "latent_px_per_s": sum(p for _, p in v) / sum(t for t, _ in v)} for arm, v in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--budget-s", type=float, default=600.0, help="process CPU seconds of training per store")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    images = copy_split(write_mixed_shapes(args.out / "mixed"), args.out)
    stores = encode_stores(args.out, images)
    results = {"kept_share": kept_shares(stores["buckets-train"]),
               "buckets": [{"size": list(b), "items": n} for b, n in
                           zip(LatentStore(stores["buckets-train"]).buckets, LatentStore(stores["buckets-train"]).bucket_counts)]}
    timing = step_times(stores, args.out, rounds=1 if args.quick else 3, steps=10 if args.quick else 60)
    results["throughput"] = timing
    results["throughput_ratio"] = timing["buckets"]["latent_px_per_s"] / timing["centre-crop"]["latent_px_per_s"]
    (args.out / "aspect-results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
