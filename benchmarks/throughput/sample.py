"""Sampling throughput: the whole job pipeline (latentpatch.sampling.generate.sample into a folder) against a plain loop.

The plain loop makes the same network calls: the same Heun sampler over the same EDMPrecond with the
full coordinate grid, one batch-wide torch.randn, then the same autoencoder decode, and writes nothing. So
the ratio is what the job costs on top: per-image generators, conditioning, PNG encoding, fsync'd atomic
writes, images.jsonl, job.json, the lock, grid.png, and loading the autoencoder. Aim: overhead under 5%.
A random DiT and a random AutoencoderTiny built from configs (no downloads) stand in for a trained run.

    python -m benchmarks.throughput.sample --n 64 --batch-size 16 --steps 18 --latent 16 --threads 1
    python -m benchmarks.throughput.sample --device cuda --n 1024 --batch-size 256
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import latentpatch
from latentpatch.autoencoders import load_autoencoder
from latentpatch.checkpoints import save_checkpoint
from latentpatch.config import load_config, save_config
from latentpatch.denoiser import build_precond
from latentpatch.diffusion.samplers import karras_sigmas, sample_heun
from latentpatch.sampling.generate import load_autoencoder_for, sample
from latentpatch.sampling.options import DEFAULTS
from latentpatch.patches import full_coordinates
from latentpatch.runs import load_run


def make_run(root: Path, args) -> Path:
    """A run folder with a random DiT (small weights everywhere, so the output is not trivially zero)."""
    if args.vae == "tiny":
        from diffusers import AutoencoderTiny

        torch.manual_seed(0)
        width = (args.vae_width,) * 4
        AutoencoderTiny(encoder_block_out_channels=width, decoder_block_out_channels=width,
                        latent_channels=4).save_pretrained(root / "vae")
        info = load_autoencoder(root / "vae").info
    else:
        info = load_autoencoder("pixel").info
    c, side = info.latent_channels, args.latent
    cfg = load_config(None, [f"model.dit.hidden_size={args.hidden}", f"model.dit.depth={args.depth}",
                             f"model.dit.num_heads={args.heads}", "model.dit.patch_size=2", "edm.sigma_data=0.5"])
    save_config(cfg, root / "config.yaml")
    (root / "run.json").write_text(json.dumps({
        "format_version": 1, "latents": str(root / "latents"), "autoencoder": info.to_dict(),
        "latent_shape": [c, side, side], "resolution": [side * info.factor] * 2, "num_classes": 0,
        "class_names": None, "text_encoder": None, "created": "", "latentpatch_version": latentpatch.__version__,
    }))
    gen = torch.Generator().manual_seed(0)
    model = build_precond(cfg, c, device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    save_checkpoint(root, 1, model, copy.deepcopy(model), torch.optim.AdamW(model.parameters()), {})
    return root


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def plain_loop(loaded, autoencoder, args, device: torch.device) -> tuple[float, float]:
    """The same sampler and network calls with no per-image bookkeeping and no files; (wall, CPU) seconds."""
    c, h, w = loaded.info["latent_shape"]
    edm = loaded.cfg.edm
    sigmas = karras_sigmas(args.steps, edm.sigma_min, edm.sigma_max, device=device)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    gen = torch.Generator(device).manual_seed(0)
    sync(device)
    start, cpu = time.perf_counter(), time.process_time()
    for first in range(0, args.n, args.batch_size):
        b = min(args.batch_size, args.n - first)
        coords = full_coordinates(b, h, w, device=device)

        def denoise(x, sigma):
            with amp:
                return loaded.precond(x, sigma, coords)

        x = torch.randn((b, c, h, w), generator=gen, device=device, dtype=torch.float64) * sigmas[0]
        images = autoencoder.decode(sample_heun(denoise, x, sigmas).float())
        images.cpu()
    sync(device)
    return time.perf_counter() - start, time.process_time() - cpu


def pipeline(loaded, out: Path, args) -> tuple[float, float]:
    start, cpu = time.perf_counter(), time.process_time()
    result = sample(loaded, n=args.n, steps=args.steps, batch_size=args.batch_size, out=out, output="none")
    elapsed = time.perf_counter() - start, time.process_time() - cpu
    assert result.written == args.n, result
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=64, help="images per timed run")
    p.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size)
    p.add_argument("--steps", type=int, default=DEFAULTS.steps, help="Heun steps (2*steps-1 network calls)")
    p.add_argument("--latent", type=int, default=16, help="latent side")
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vae", choices=("tiny", "pixel"), default="tiny", help="random AutoencoderTiny or identity")
    p.add_argument("--vae-width", type=int, default=32, help="AutoencoderTiny block channels")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--repeats", type=int, default=5, help="alternating runs of each; medians and bests reported")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        loaded = load_run(make_run(tmp / "run", args), device=device)
        autoencoder = load_autoencoder_for(loaded, device)
        warm = argparse.Namespace(**{**vars(args), "n": args.batch_size})
        plain_loop(loaded, autoencoder, warm, device)  # warm-up: allocations, kernel selection
        pipeline(loaded, tmp / "warm", warm)
        plain, piped = [], []
        for r in range(args.repeats):
            plain.append(plain_loop(loaded, autoencoder, args, device))
            piped.append(pipeline(loaded, tmp / f"out{r}", args))

    n = args.n
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    c, h, w = loaded.info["latent_shape"]
    print(f"device {device} ({name}), torch threads {torch.get_num_threads()}, DiT hidden {args.hidden} depth "
          f"{args.depth} on {c}x{h}x{w} latents, {args.vae} decode, Heun {args.steps} steps, {n} images, "
          f"batch {args.batch_size}")
    for k, what in ((0, "wall"), (1, "CPU (all threads)")):
        a, b = [t[k] for t in plain], [t[k] for t in piped]
        print(f"{what} time:")
        print(f"  plain sampler loop: {n / min(a):8.2f} images/s  (runs: {', '.join(f'{n / t:.2f}' for t in a)})")
        print(f"  sample() pipeline:  {n / min(b):8.2f} images/s  (runs: {', '.join(f'{n / t:.2f}' for t in b)})")
        best, med = min(b) / min(a), statistics.median(b) / statistics.median(a)
        print(f"  pipeline / plain time per image: {best:.3f} (best runs), {med:.3f} (medians); "
              f"overhead {100 * (best - 1):+.1f}% best-to-best (aim < 5%)")

if __name__ == "__main__":
    main()
