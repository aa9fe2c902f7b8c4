"""Check 4: lp.encode (files -> latent store) against a plain loop of the autoencoder's encode.

An AutoencoderKL of Stable Diffusion's shape (block_out_channels 128,256,512,512, two layers per block, 4 latent
channels; random weights, built from diffusers' class and saved as a folder) at 256 px. The plain loop gets
the same images already decoded and on the device (benchmarks.throughput.encode's), so the ratio is what the pipeline
adds: reading, hashing, decoding, copying, writing shards. Runs alternate; the best of each counts.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import latentpatch as lp

from ...throughput.encode import make_vae, plain_loop
from .common import Context, Row, ratio_row

DISTINCT = 32  # distinct pictures; the other files are byte copies under new names


def make_pngs(folder: Path, n: int, px: int) -> torch.Tensor:
    """n PNGs of smooth random colour fields (they compress like photos, not like noise); returns them as
    [n, 3, px, px] in [-1, 1], what the plain loop encodes."""
    rng = np.random.default_rng(0)
    pictures = []
    for i in range(min(n, DISTINCT)):
        coarse = rng.uniform(0, 255, size=(4, 4, 3)).astype(np.uint8)
        picture = Image.fromarray(coarse).resize((px, px), Image.Resampling.BICUBIC)
        picture.save(folder / f"{i:05d}.png")
        pictures.append(torch.from_numpy(np.array(picture)).permute(2, 0, 1))
    for i in range(DISTINCT, n):
        shutil.copyfile(folder / f"{i % DISTINCT:05d}.png", folder / f"{i:05d}.png")
    return torch.stack([pictures[i % DISTINCT] for i in range(n)]).float() / 127.5 - 1


def run(ctx: Context) -> list[Row]:
    s = ctx.sizes
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        pixels = make_pngs(tmp / "images", s.encode_images, s.encode_px)
        vae_dir = make_vae(tmp / "vae", s.vae_channels, 2)
        ae = lp.load_autoencoder(vae_dir, device=ctx.device)  # bf16 on CUDA, fp32 on the CPU (its defaults)
        batches = list(pixels.to(ctx.device, ae.dtype).split(s.encode_batch))
        plain_loop(ae, batches[:2])  # warm-up: first-call allocations and kernel selection
        plain, piped = [], []
        for r in range(2):
            plain.append(plain_loop(ae, batches))
            t0 = time.perf_counter()
            summary = lp.encode(tmp / "images", tmp / f"store{r}", ae, s.encode_px, batch_size=s.encode_batch)
            piped.append(time.perf_counter() - t0)
            assert summary.encoded == s.encode_images, summary.lines()
    n = s.encode_images
    return [ratio_row(f"4 encode/plain vae.encode, {s.encode_px} px", min(piped), min(plain), 1.10,
                      f"{n} PNGs, VAE {','.join(map(str, s.vae_channels))} {ae.dtype}, batch {s.encode_batch}: "
                      f"pipeline {n / min(piped):.1f} img/s, plain {n / min(plain):.1f} img/s (best of 2 each)")]
