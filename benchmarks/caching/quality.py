"""The quality cost of each cache arm: its samples' FID, KID and SWD against the run's reference images, beside
the uncached sampler's at two seeds (the seed spread: how much FID moves with the draw alone), and each sample's
distance to the uncached sample of the same seed (mean absolute difference in 8-bit levels, PSNR).

    python -m benchmarks.caching.quality latentpatch-demo/run --ref latentpatch-demo/images --n 64 \
        --work caching-samples/demo --out docs/figures/caching-quality-demo.json
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from latentpatch.metrics.evaluate import evaluate_folders, save_reference_stats
from latentpatch.metrics.inception import load_inception
from latentpatch.runs import load_run
from latentpatch.sampling import job_folder
from latentpatch.sampling.generate import sample

from .arms import add_job_arguments, arms_for, job_kwargs, write_result


def paired_distance(folder: Path, reference: Path) -> dict[str, float]:
    """Mean |a - b| in 8-bit levels and PSNR (dB) between the images of two jobs of the same seeds."""
    total = len(json.loads((folder / job_folder.JOB_FILE).read_text())["images"])
    a = job_folder.read_images(folder, total, as_tensor=True)
    b = job_folder.read_images(reference, total, as_tensor=True)
    mse = float(((a - b) ** 2).mean())
    return {"mean_abs_8bit": float((a - b).abs().mean()) * 255, "psnr_db": 10 * math.log10(1 / mse) if mse else math.inf}


def _report(folder: Path, name: str, make) -> dict:
    """The metrics of folder/NAME.json, computed by `make(path)` unless a finished rerun left them there."""
    path = folder / f"{name}.json"
    return json.loads(path.read_text())["metrics"] if path.exists() else make(path)["metrics"]


def scores(folder: Path, ref: Path, ref_stats: Path, extractor) -> dict[str, float]:
    inception = _report(folder, "eval-inception", lambda path: evaluate_folders(
        folder, ref_stats, metrics="fid,kid", extractor=extractor, device="cpu", report=path))
    swd = _report(folder, "eval-swd", lambda path: evaluate_folders(folder, ref, metrics="swd", device="cpu",
                                                                    report=path))
    return {"fid": inception["fid"], "kid": inception["kid"], "kid_std": inception["kid_std"],
            "swd": swd["swd"]["mean"]}


def measure(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    loaded = load_run(Path(args.run), device="cpu")
    arms = arms_for(loaded, args.arms.split(",") if args.arms else None)
    seeds = [int(s) for s in args.seeds.split(",")]
    extractor = load_inception()
    args.work.mkdir(parents=True, exist_ok=True)
    ref_stats = args.work / "reference-stats.npz"
    if not ref_stats.exists():
        save_reference_stats(args.ref, ref_stats, extractor=extractor, device="cpu")
    result = {"run": str(args.run), "reference": str(args.ref),
              "settings": {k: str(v) for k, v in vars(args).items() if k not in ("run", "out", "work")}, "arms": {}}
    for arm, spec in arms.items():
        for seed in seeds if spec is None else seeds[:1]:
            folder = args.work / f"{arm.replace(' ', '-')}-seed{seed}"
            sample(loaded, cache=spec, out=folder, output="none", **job_kwargs(args, args.n, seed))  # or resume
            row = {"cache": spec, "seed": seed, "n": len(job_folder.done_indices(folder, 10**7)),
                   **scores(folder, Path(args.ref), ref_stats, extractor)}
            if spec is not None:
                row |= paired_distance(folder, args.work / f"uncached-seed{seed}")
            result["arms"][f"{arm} seed{seed}"] = row
            print(f"{arm} seed {seed}: " + ", ".join(f"{k} {v:.4g}" for k, v in row.items()
                                                     if isinstance(v, float)), flush=True)
    return result


def print_table(result: dict) -> None:
    rows = result["arms"]
    base = [r for r in rows.values() if r["cache"] is None]
    print(f"\n{base[0]['n']} samples per arm; uncached FID at seeds {[r['seed'] for r in base]}: "
          f"{[round(r['fid'], 2) for r in base]}")
    print("| arm | FID | KID x1000 | SWD | FID change | mean abs. diff. to uncached (8-bit) | PSNR (dB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        change = 100 * (r["fid"] / base[0]["fid"] - 1)
        paired = f"{r['mean_abs_8bit']:.2f} | {r['psnr_db']:.1f}" if "psnr_db" in r else "– | –"
        print(f"| {name} | {r['fid']:.2f} | {1000 * r['kid']:.2f} | {r['swd']:.2f} | {change:+.1f}% | {paired} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_job_arguments(p)
    p.add_argument("--ref", type=Path, required=True, help="reference image folder (the run's training images)")
    p.add_argument("--n", type=int, default=64, help="images per prompt (or in all) per arm")
    p.add_argument("--seeds", default="0,1", help="the uncached arm samples each; the cached arms the first")
    p.add_argument("--work", type=Path, required=True, help="where the sample folders go (resumable)")
    p.add_argument("--out", type=Path, default=None, help="the raw results as JSON")
    args = p.parse_args()
    result = measure(args)
    print_table(result)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
