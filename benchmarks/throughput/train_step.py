"""Training-step throughput, side by side: the real trainer, a plain loop over the same model, diffusers' DiT.

  trainer   latentpatch.training.train: batch draw from the in-memory store, EDM loss, backward, gradient
            clipping, AdamW, EMA, loss bookkeeping (timed step to step through its callback)
  plain     the same preconditioned DiT (latentpatch.denoiser.build_precond), tensors already on the device:
            only forward, backward and AdamW.step
  diffusers diffusers.DiTTransformer2DModel of the same width, depth, heads and patch size (class-conditional
            with adaLN-Zero, as DiT is; its class embedding adds parameters), the same plain loop

Per patch stage of the latent schedule (full size at batch B, half side at batch 2B) and for the schedule as a
whole (real_p 0.5). Every arm runs in this one process, interleaved step by step (the trainer's callback runs
one plain step and one diffusers step between two trainer steps, so a shared machine's load drifts over all
three alike), timed with the same clock (process CPU time on the CPU, CUDA-synchronised wall time on a GPU);
medians. Achieved FLOP/s (torch.utils.flop_counter on one forward + backward) over the measured matmul peak of
this device (fp32 on the CPU, bf16 on CUDA).

    OMP_NUM_THREADS=1 python -m benchmarks.throughput.train_step --device cpu --threads 1 --size S --batch 16 --steps 4 --rounds 2
    OMP_NUM_THREADS=1 python -m benchmarks.throughput.train_step --device cpu --threads 1 --size B --batch 8 --steps 3 --rounds 2

(One thread on a shared CPU: with two, OpenMP's spinning threads make the process time of every arm vary by
tens of percent with the machine's load.)
    python -m benchmarks.throughput.train_step --device cuda --size B --batch 256 --rounds 5      # and --size XL
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from latentpatch.config import load_config
from latentpatch.denoiser import build_precond
from latentpatch.diffusion.edm import denoising_loss_at
from latentpatch.models.presets import DIT_SIZES
from latentpatch.training.results import StepInfo
from latentpatch.training.trainer import train

from .measure import Clock, matmul_peak, step_flops
from .synthetic import C, make_store, plain_inputs


def config(size: str, batch: int, stage: str, device: torch.device):
    depth, hidden, heads = DIT_SIZES[size]
    patches = {"full": ["patches.real_p=1", "patches.sizes=[]"], "half": ["patches.real_p=0", "patches.sizes=[0.5]"],
               "schedule": ["patches.real_p=0.5", "patches.sizes=[0.5]"]}[stage]
    return load_config(None, [f"model.dit.preset=DiT-{size}/2", "model.attention=sdpa", f"train.batch_size={batch}",
                              "edm.sigma_data=1.0", "optim.warmup_steps=1", "train.log_every=100000",
                              "train.ckpt_every=100000", "train.keep_checkpoints=1",
                              "heldout.share=0",  # steps only: no held-out evaluation (on by default for small stores)
                              f"train.precision={'bf16' if device.type == 'cuda' else 'fp32'}"] + patches)


class PlainLoop:
    """forward, backward, AdamW.step of one model on fixed tensors; `step()` returns its time."""

    def __init__(self, model, loss_fn, clock: Clock, autocast) -> None:
        self.model, self.loss_fn, self.clock, self.autocast = model, loss_fn, clock, autocast
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # the trainer's optimiser

    def step(self) -> float:
        t0 = self.clock()
        self.optimizer.zero_grad(set_to_none=True)
        with self.autocast():
            loss = self.loss_fn()
        loss.backward()
        self.optimizer.step()
        return self.clock() - t0


def time_interleaved(cfg, store: Path, steps: int, clock: Clock, device: torch.device,
                     loops: dict[str, PlainLoop]) -> dict[str, list[float]]:
    """The real trainer's step-to-step times, with one step of each plain loop run between two of its steps
    (inside its callback, not counted as its time); the first 2 steps of each are warm-up."""
    times: dict[str, list[float]] = {"trainer": [], **{name: [] for name in loops}}
    last: list[float] = []

    def callback(info: StepInfo) -> None:
        now = clock()
        if last and info.step > 2:
            times["trainer"].append(now - last[0])
        for name, loop in loops.items():
            t = loop.step()
            if info.step > 2:
                times[name].append(t)
        last[:] = [clock()]

    cfg.train.max_steps = steps + 2
    with tempfile.TemporaryDirectory() as tmp:
        train(cfg, store, Path(tmp) / "run", device=device, progress=False, callback=callback)
    return times


def ours(cfg, device):
    torch.manual_seed(0)
    return build_precond(cfg, C, device=device).to(device).train()


def diffusers_dit(size: str, full: int, device):
    from diffusers import DiTTransformer2DModel

    depth, hidden, heads = DIT_SIZES[size]
    torch.manual_seed(0)
    return DiTTransformer2DModel(num_attention_heads=heads, attention_head_dim=hidden // heads, in_channels=C,
                                 out_channels=C, num_layers=depth, sample_size=full, patch_size=2).to(device).train()


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--size", default="S", choices=sorted(DIT_SIZES))
    ap.add_argument("--latent", type=int, default=32, help="latent side (32 = 256 px through an f8 VAE)")
    ap.add_argument("--batch", type=int, default=16, help="full-size batch; half-side steps use twice it")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per arm and stage in each round")
    ap.add_argument("--rounds", type=int, default=3)
    return ap.parse_args()


def measure(args, stages: dict[str, tuple[int, int]], device: torch.device) -> tuple[dict, dict, float]:
    """({arm: {stage: step times}}, {stage: FLOPs of ours and diffusers'}, matmul peak) over the rounds."""
    clock = Clock(device)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else \
        (lambda: torch.autocast("cpu", enabled=False))
    full = args.latent
    results = {arm: {s: [] for s in stages} for arm in ("trainer", "plain", "diffusers")}
    flops = {}
    peaks = [matmul_peak(device, clock)]  # measured again at the end: the best of the two is the peak
    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(Path(tmp) / "store", full)
        cfg = config(args.size, args.batch, "full", device)
        net_ours, net_theirs = ours(cfg, device), diffusers_dit(args.size, full, device)
        print(f"DiT-{args.size}/2 at {full}x{full}: ours {sum(p.numel() for p in net_ours.parameters()) / 1e6:.1f}M "
              f"parameters, diffusers' {sum(p.numel() for p in net_theirs.parameters()) / 1e6:.1f}M; "
              f"{torch.get_num_threads()} threads, {device}", flush=True)
        for r in range(args.rounds):
            for stage, (side, batch) in stages.items():
                x0, coords, sigma, noise = plain_inputs(side, batch, full, device, seed=r)
                labels = torch.zeros(batch, dtype=torch.long, device=device)

                def loss_ours():
                    return denoising_loss_at(net_ours, x0, coords, sigma, noise, sigma_data=1.0).mean()

                def loss_theirs():
                    out = net_theirs(x0 + noise, sigma * 100, labels, return_dict=False)[0]
                    return (out - noise).square().mean()

                if stage not in flops:
                    flops[stage] = {"ours": step_flops(loss_ours), "diffusers": step_flops(loss_theirs)}
                loops = {"plain": PlainLoop(net_ours, loss_ours, clock, autocast),
                         "diffusers": PlainLoop(net_theirs, loss_theirs, clock, autocast)}
                for arm, times in time_interleaved(config(args.size, args.batch, stage, device), store, args.steps,
                                                   clock, device, loops).items():
                    results[arm][stage] += times
            print(f"round {r + 1}/{args.rounds} done", flush=True)
        peak = max(peaks + [matmul_peak(device, clock)])
    return results, flops, peak


def print_report(args, stages: dict[str, tuple[int, int]], results: dict, flops: dict, peak: float) -> None:
    med = {arm: {s: statistics.median(v) for s, v in by.items()} for arm, by in results.items()}
    print(f"\nmatmul peak {peak / 1e9:.1f} GFLOP/s; medians of {args.rounds * args.steps} steps per cell")
    print(f"{'stage':10s} {'trainer s':>10s} {'plain s':>9s} {'diffusers s':>12s} {'trainer/plain':>14s} "
          f"{'diffusers/ours':>15s} {'ours of peak':>13s} {'diffusers of peak':>18s}")
    for stage, (side, batch) in stages.items():
        t, p, d = med["trainer"][stage], med["plain"][stage], med["diffusers"][stage]
        print(f"{stage + f' {side}px x{batch}':10s} {t:10.3f} {p:9.3f} {d:12.3f} {t / p:14.3f} {d / p:15.3f} "
              f"{flops[stage]['ours'] / p / peak:13.1%} {flops[stage]['diffusers'] / d / peak:18.1%}")
    # The schedule (real_p 0.5): half the steps at each stage; full-size-equivalent images per second.
    img = {arm: (args.batch + 2 * args.batch / 4) / (med[arm]["full"] + med[arm]["half"]) for arm in med}
    img_full = {arm: args.batch / med[arm]["full"] for arm in med}
    print(f"schedule (real_p 0.5): full-size-equivalent images/s trainer {img['trainer']:.2f}, plain "
          f"{img['plain']:.2f}, diffusers {img['diffusers']:.2f}; vs full-size only: trainer x"
          f"{img['trainer'] / img_full['trainer']:.2f}, plain x{img['plain'] / img_full['plain']:.2f}")


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    stages = {"full": (args.latent, args.batch), "half": (args.latent // 2, 2 * args.batch)}
    results, flops, peak = measure(args, stages, device)
    print_report(args, stages, results, flops, peak)


if __name__ == "__main__":
    main()
