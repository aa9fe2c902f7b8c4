"""Patch Diffusion's latent schedule against full-size training: same model, same data, one process.

Both runs go through `latentpatch.training.train` (the real loop) from the same initial weights. Reported:
  * step throughput: steps/s, full-size-equivalent images/s and samples/s, and the mean step time per
    patch size;
  * time to reach the same held-out loss: the EDM-weighted full-size denoising loss of the EMA on held-out
    images at a fixed sigma grid and fixed noise (evaluated every --eval-every-s of training time; the
    target is the best loss the slower-learning run reached, crossing times interpolated between evals);
  * achieved FLOP/s of the training steps (torch.utils.flop_counter.FlopCounterMode on one forward +
    backward per patch size) over the measured matmul peak of this machine (fp32 on CPU, bf16 on CUDA).

Data: scikit-image photos, random crops downsampled to R x R, encoded through `latentpatch.encoding.encode` with the
"pixel" autoencoder (latents = pixels, so no download and no VAE cost). CPU, about 8 minutes:

    python benchmarks/patch_vs_full.py --device cpu --threads 1 --resolution 32 --hidden 64 --depth 4 --budget-s 150

(on a CPU that others share, add --clock process: step time as this process's CPU time)

GPU (bigger model and images):

    python benchmarks/patch_vs_full.py --device cuda --resolution 64 --hidden 384 --depth 12 --heads 6 \
        --batch 64 --images 512 --budget-s 120 --eval-every-s 10
"""

from __future__ import annotations

import argparse
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import skimage.data
import torch
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

from latentpatch.config import load_config
from latentpatch.data.store import LatentStore
from latentpatch.denoiser import build_precond
from latentpatch.diffusion.edm import denoising_loss_at, fixed_noise, heldout_sigma_grid
from latentpatch.encoding import encode
from latentpatch.patches import PatchSchedule, full_coordinates, random_crops
from latentpatch.training.trainer import StepInfo, train

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
          "camera", "brick", "grass", "gravel", "moon")


def write_photo_crops(folder: Path, n: int, size: int, seed: int, scale: int = 4) -> None:
    """n PNGs of size x size: random (size*scale)^2 crops of the sample photos, downsampled."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = []
    for name in PHOTOS:
        im = getattr(skimage.data, name)()
        photos.append(Image.fromarray(im).convert("RGB"))
    side = size * scale
    for i in range(n):
        p = photos[i % len(photos)]
        top, left = int(rng.integers(0, p.height - side + 1)), int(rng.integers(0, p.width - side + 1))
        crop = p.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.LANCZOS)
        crop.save(folder / f"{i:05d}.png")


def make_store(root: Path, name: str, n: int, size: int, seed: int) -> Path:
    write_photo_crops(root / f"{name}-images", n, size, seed)
    encode(root / f"{name}-images", root / name, "pixel", size, device="cpu", dtype="float32", workers=0)
    return root / name


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, clock: str = "wall") -> tuple[float, str]:
    """FLOP/s of a large square matmul: fp32 on CPU, bf16 on CUDA (the dtype training's matmuls use).

    Timed with the same clock as the training steps (process CPU time for --clock process).
    """
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    now = time.process_time if clock == "process" and device.type == "cpu" else time.perf_counter
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(device)
    reps, start = 0, now()
    while now() - start < 2.0:
        a @ b
        reps += 1
        if device.type == "cuda" and reps % 10 == 0:
            sync(device)
    sync(device)
    return 2 * n**3 * reps / (now() - start), f"{n}x{n} {str(dtype)[6:]} matmul, {clock} clock"


def step_flops(cfg, latents: torch.Tensor, height: int, width: int, batch: int, device: torch.device) -> float:
    """FLOPs of one training forward + backward at this patch size (FlopCounterMode counts matmul/conv/attention)."""
    torch.manual_seed(0)
    precond = build_precond(cfg, latents.shape[1], device=device).to(device)
    x = latents[torch.arange(batch) % latents.shape[0]].to(device)
    crops, coords = random_crops(x, height, width, torch.Generator(device).manual_seed(0))
    sigma = torch.full((batch,), 1.0, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with FlopCounterMode(display=False) as counter, autocast:
        denoising_loss_at(precond, crops, coords, sigma, torch.randn_like(crops), sigma_data=0.5).mean().backward()
    return float(counter.get_total_flops())


class Recorder:
    """The train() callback: step times per patch size, held-out loss every eval_every_s, stop at the budget.

    clock "wall" counts the trainer's own step time (StepInfo.train_seconds); "process" counts this
    process's CPU time between steps (held-out evaluations excluded), which a busy shared CPU disturbs
    far less than wall time (with one thread, CPU seconds are step seconds).
    """

    def __init__(self, heldout: torch.Tensor, device: torch.device, budget_s: float, eval_every_s: float,
                 clock: str = "wall"):
        self.device, self.budget_s, self.eval_every_s, self.clock = device, budget_s, eval_every_s, clock
        sigmas = heldout_sigma_grid(8)
        self.x0 = heldout.repeat_interleave(len(sigmas), 0).to(device)
        self.sigmas = sigmas.repeat(len(heldout)).to(device)
        self.noise = fixed_noise(self.x0.shape, seed=2024, device=device)
        self.coords = full_coordinates(self.x0.shape[0], *heldout.shape[-2:], device=device)
        self.evals: list[tuple[float, int, float]] = []  # (train seconds, step, held-out loss)
        self.steps: list[tuple[tuple[int, int], int, float]] = []  # (patch, batch, seconds)
        self.seconds, self.last_wall, self.last_cpu, self.next_eval = 0.0, 0.0, None, 0.0
        self.info: StepInfo | None = None

    @torch.no_grad()
    def heldout_loss(self, precond) -> float:
        total = 0.0
        for i in range(0, self.x0.shape[0], 256):
            sl = slice(i, i + 256)
            total += denoising_loss_at(precond.eval(), self.x0[sl], self.coords[sl], self.sigmas[sl],
                                       self.noise[sl], sigma_data=0.5).sum().item()
        return total / self.x0.shape[0]

    def __call__(self, info: StepInfo) -> bool:
        wall = info.train_seconds - self.last_wall
        if self.clock == "process" and self.last_cpu is not None:
            step_s = time.process_time() - self.last_cpu
        else:  # wall clock, and the first step under either clock (setup precedes it)
            step_s = wall
        self.last_wall, self.info = info.train_seconds, info
        self.seconds += step_s
        self.steps.append((info.patch, info.batch_size, step_s))
        if self.seconds >= self.next_eval or self.seconds >= self.budget_s:
            self.evals.append((self.seconds, info.step, self.heldout_loss(info.ema)))
            self.next_eval += self.eval_every_s
        self.last_cpu = time.process_time()
        return self.seconds >= self.budget_s


def time_to_reach(evals: list[tuple[float, int, float]], target: float) -> float:
    """First training time at which the held-out loss is <= target, linear between evaluations."""
    prev = None
    for t, _, loss in evals:
        if loss <= target:
            if prev is None or prev[1] == loss:
                return t
            (t0, l0) = prev
            return t0 + (t - t0) * (l0 - target) / (l0 - loss)
        prev = (t, loss)
    return math.inf


def run_one(name, cfg, store, root, heldout, device, args) -> Recorder:
    rec = Recorder(heldout, device, args.budget_s, args.eval_every_s, args.clock)
    print(f"[{name}] training for {args.budget_s:.0f} s of step time ({args.clock} clock) ...", flush=True)
    train(cfg, store, root / f"run-{name}", device=device, progress=False, callback=rec)
    return rec


def summarise(name: str, rec: Recorder, flops: dict[tuple[int, int], float], peak: float) -> dict:
    seconds = rec.seconds
    total_flops = sum(flops[patch] for patch, _, _ in rec.steps)
    per_patch: dict[tuple[int, int], list[float]] = {}
    for patch, _, s in rec.steps[1:]:  # the first step pays one-time costs
        per_patch.setdefault(patch, []).append(s)
    return {
        "name": name, "steps": rec.info.step, "seconds": seconds, "steps_s": rec.info.step / seconds,
        "img_s": rec.info.nimg / seconds, "samples_s": sum(b for _, b, _ in rec.steps) / seconds,
        "step_ms": {p: 1000 * float(np.median(v)) for p, v in sorted(per_patch.items())},
        "flop_s": total_flops / seconds, "mfu": total_flops / seconds / peak, "final": rec.evals[-1][2],
        "best": min(loss for _, _, loss in rec.evals), "evals": rec.evals,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--resolution", type=int, default=32, help="image side = latent side (pixel autoencoder)")
    ap.add_argument("--images", type=int, default=192, help="training images")
    ap.add_argument("--heldout", type=int, default=32, help="held-out images (x 8 sigmas)")
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16, help="full-size batch; half-side patches get 2x")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--budget-s", type=float, default=150.0, help="training (step) seconds per run")
    ap.add_argument("--eval-every-s", type=float, default=10.0)
    ap.add_argument("--clock", choices=("wall", "process"), default="wall",
                    help="step time as wall time, or as this process's CPU time (steadier on a busy shared CPU)")
    ap.add_argument("--workdir", default=None, help="keep stores and runs here (default: a temporary folder)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"device {device}, torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        store = make_store(root, "train", args.images, args.resolution, seed=0)
        heldout = LatentStore(make_store(root, "heldout", args.heldout, args.resolution, seed=1)).load()["mean"].float()
        common = [
            "model.arch=dit", "model.dit.preset=null", f"model.dit.hidden_size={args.hidden}", f"model.dit.depth={args.depth}",
            f"model.dit.num_heads={args.heads}", "model.dit.patch_size=2", f"optim.lr={args.lr}", "optim.warmup_steps=50",
            "edm.sigma_data=0.5",
            f"train.batch_size={args.batch}", "train.max_steps=1000000000", "train.log_every=100",
            "train.ckpt_every=1000000000", "train.keep_checkpoints=1", "train.ema_halflife_kimg=0.5",
            "train.ema_rampup=0.05",
        ]
        configs = {"patch": load_config("patch-latent", common), "full": load_config("full-size", common)}
        peak, peak_what = matmul_peak(device, args.clock)
        print(f"matmul peak: {peak / 1e9:.1f} GFLOP/s ({peak_what})")
        lat = LatentStore(store).load()["mean"].float()
        results = []
        for name, cfg in configs.items():
            side = args.resolution
            stages = PatchSchedule(cfg.patches, side, side, args.batch, multiple_of=2).stages
            flops = {(s.height, s.width): step_flops(cfg, lat, s.height, s.width, s.batch_size, device)
                     for s in stages}
            rec = run_one(name, cfg, store, root, heldout, device, args)
            results.append(summarise(name, rec, flops, peak))
            print(f"[{name}] {rec.info.step} steps, held-out loss {results[-1]['final']:.4f}", flush=True)
        report(results, args)


def report(results: list[dict], args) -> None:
    patch, full = results
    target = max(patch["best"], full["best"])  # a loss both runs reached
    for r in results:
        r["t_target"] = time_to_reach(r["evals"], target)
    rows = [
        ("steps in budget", lambda r: f"{r['steps']}"),
        ("steps/s", lambda r: f"{r['steps_s']:.2f}"),
        ("full-size-equiv. images/s", lambda r: f"{r['img_s']:.1f}"),
        ("samples (patches)/s", lambda r: f"{r['samples_s']:.1f}"),
        ("median step ms by patch", lambda r: ", ".join(f"{p[0]}px {ms:.0f}" for p, ms in r["step_ms"].items())),
        ("achieved GFLOP/s", lambda r: f"{r['flop_s'] / 1e9:.2f}"),
        ("of matmul peak", lambda r: f"{100 * r['mfu']:.1f}%"),
        ("held-out loss at end", lambda r: f"{r['final']:.4f}"),
        (f"seconds to loss {target:.4f}", lambda r: f"{r['t_target']:.1f}"),
    ]
    print(f"\nresolution {args.resolution}, DiT hidden {args.hidden} depth {args.depth} heads {args.heads} patch 2, "
          f"batch {args.batch}, budget {args.budget_s:.0f} s per run ({args.clock} clock)")
    print(f"{'':30s} {'patch (real_p 0.5, [0.5])':>28s} {'full-size':>28s}")
    for label, fmt in rows:
        print(f"{label:30s} {fmt(patch):>28s} {fmt(full):>28s}")
    print(f"\npatch / full: steps/s x{patch['steps_s'] / full['steps_s']:.2f}, images/s x{patch['img_s'] / full['img_s']:.2f}, "
          f"time to the same held-out loss x{patch['t_target'] / full['t_target']:.2f} (< 1: patch is faster)")
    for r in results:
        print(f"{r['name']} evals (s, step, loss): " + " ".join(f"({t:.0f},{s},{loss:.4f})" for t, s, loss in r["evals"]))


if __name__ == "__main__":
    main()
