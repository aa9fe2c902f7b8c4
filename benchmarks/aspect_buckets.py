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
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

import latentpatch as lp
from aspect_data import split, write_mixed_shapes
from latentpatch.data.buckets import kept_share
from latentpatch.data.store import LatentStore
from latentpatch.training.logging import read_log

SIDE = 64  # pixels: the square of the bucket area
ARMS = {  # arm: (its stores' kind, config overrides)
    "buckets": ("buckets", []),  # per-axis coordinates, the library's default
    "buckets/longer-side": ("buckets", ["patches.coordinate_scale=longer-side"]),
    "centre-crop": ("square", []),
}
TIMED = ("buckets", "centre-crop")  # the throughput comparison
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
    times: dict[str, list[tuple[float, int]]] = {arm: [] for arm in TIMED}
    for r in range(rounds):
        for arm in TIMED:
            kind = ARMS[arm][0]
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


def train_one(arm: str, store: Path, heldout: Path, out: Path, budget_s: float, seed: int, eval_every: int) -> None:
    """One arm trained for `budget_s` process CPU seconds with one thread (the caller runs it in its own process)."""
    torch.set_num_threads(1)
    cfg = run_config(heldout, seed, [f"heldout.every={eval_every}"] + ARMS[arm][1])
    start = time.process_time()
    lp.train(cfg, store, out, device="cpu", progress=False,
             callback=lambda info: time.process_time() - start >= budget_s)


def train_arms(stores: dict[str, Path], root: Path, budget_s: float, seed: int, eval_every: int,
               jobs: int, arms: list[str]) -> dict[str, Path]:
    """The arms, `jobs` at once, each in its own single-threaded process (a finished run is kept)."""
    runs = {arm: root / f"run-{arm.replace('/', '-')}-{budget_s:g}s-seed{seed}" for arm in arms}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}

    def launch(arm: str) -> None:
        if (runs[arm] / "done").is_file():
            return
        shutil.rmtree(runs[arm], ignore_errors=True)
        kind = ARMS[arm][0]
        code = ("import sys; sys.path.insert(0, sys.argv[1]); from aspect_buckets import train_one; from pathlib import Path; "
                "train_one(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]), Path(sys.argv[5]), float(sys.argv[6]), "
                "int(sys.argv[7]), int(sys.argv[8]))")
        subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), arm, str(stores[f"{kind}-train"]),
                        str(stores[f"{kind}-heldout"]), str(runs[arm]), str(budget_s), str(seed), str(eval_every)],
                       env=env, check=True)
        (runs[arm] / "done").write_text("")

    with ThreadPoolExecutor(jobs) as pool:
        list(pool.map(launch, arms))
    return runs


def score_per_bucket(runs: dict[str, Path], heldout: Path) -> dict[str, dict]:
    """Each arm's best checkpoint (its EMA) scored on the bucketed held-out images, each at its own shape."""
    from latentpatch.metrics.denoising import run_denoising_loss
    from latentpatch.runs import load_run

    out = {}
    for arm, run in runs.items():
        loss = run_denoising_loss(load_run(run), heldout)
        out[arm] = {"mean": loss.mean, "per_bucket": {f"{b['latent'][1] * 4}x{b['latent'][0] * 4}": b["mean"]
                                                      for b in loss.per_bucket}}
    return out


def sample_picture(runs: dict[str, Path], path: Path, n: int) -> None:
    """A row per (model, shape): n samples at that shape, the same seeds in every row."""
    from PIL import Image, ImageDraw

    rows = []
    for arm, run in runs.items():
        for name, size in SHAPES.items():
            images = lp.sample(run, n=n, size=size, seed=0, device="cpu")
            rows.append((f"{arm}, {name}", images))
    pad, label_h = 4, 14
    width = max(sum(im.width + pad for im in ims) for _, ims in rows) + pad
    height = sum(label_h + ims[0].height + pad for _, ims in rows) + pad
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw, y = ImageDraw.Draw(sheet), pad
    for label, ims in rows:
        draw.text((pad, y), label, fill=(0, 0, 0))
        y += label_h
        x = pad
        for im in ims:
            sheet.paste(im, (x, y))
            x += im.width + pad
        y += ims[0].height + pad
    sheet.save(path)


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
