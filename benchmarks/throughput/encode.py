"""Encode throughput: the whole pipeline (files -> latent store) against a plain loop of `vae.encode`.

The plain loop gets the same images already decoded, resized and on the device, so the ratio is what
everything else costs: reading, hashing, decoding, resizing, copying, writing shards and manifests.
Aim: pipeline time per image at most 1.10 x the plain loop's. A random AutoencoderKL built from a config
(no downloads) stands in for a real VAE; skimage photos stand in for a dataset.

    python -m benchmarks.throughput.encode --images 64 --resolution 128 --batch-size 16 --workers 2
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import skimage.data
import torch
from diffusers import AutoencoderKL
from PIL import Image
from torch.utils.data import DataLoader

from latentpatch.autoencoders import load_autoencoder
from latentpatch.data.images import decode_file, scan_images
from latentpatch.data.transforms import resize_center_crop
from latentpatch.device import resolve_device
from latentpatch.encoding.encode import encode

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")


def make_images(folder: Path, n: int, resolution: int, distinct: int) -> None:
    """n photo files, 1.25 R x R (so each is resized and cropped), alternating JPEG and PNG; past `distinct`
    they are byte copies under new names, which is all the pipeline sees of a larger dataset."""
    for i in range(n):
        path = folder / f"{i:05d}.{'jpg' if i % 2 else 'png'}"
        if i >= distinct:
            shutil.copyfile(folder / f"{i % distinct:05d}.{'jpg' if i % 2 else 'png'}", path)
            continue
        photo = Image.fromarray(getattr(skimage.data, PHOTOS[i % len(PHOTOS)])()).convert("RGB")
        left = (i // len(PHOTOS)) * 3
        crop = photo.crop((left, 0, left + min(photo.width - left, photo.height * 5 // 4), photo.height))
        crop.resize((resolution * 5 // 4, resolution), Image.Resampling.LANCZOS).save(path, quality=95)


def decode_only(src: Path, workers: int, batch_size: int) -> float:
    """Seconds to read and decode every file through a DataLoader: the pipeline's ceiling on this CPU."""
    files = [src / f for f in scan_images(src)]
    loader = DataLoader(
        files, batch_size=batch_size, num_workers=workers, collate_fn=lambda paths: [decode_file(p) for p in paths]
    )
    start = time.perf_counter()
    for _ in loader:
        pass
    return time.perf_counter() - start


def make_vae(folder: Path, channels: tuple[int, ...], layers: int) -> Path:
    torch.manual_seed(0)
    n = len(channels)
    AutoencoderKL(
        block_out_channels=channels, down_block_types=("DownEncoderBlock2D",) * n,
        up_block_types=("UpDecoderBlock2D",) * n, layers_per_block=layers, latent_channels=4,
        norm_num_groups=min(32, channels[0]), sample_size=128,
    ).save_pretrained(folder)
    return folder


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_loop(ae, batches: list[torch.Tensor]) -> float:
    sync(ae.device)
    start = time.perf_counter()
    for batch in batches:
        ae.encode(batch).cpu()
    sync(ae.device)
    return time.perf_counter() - start


def pipeline(ae, src: Path, out: Path, args) -> float:
    start = time.perf_counter()
    summary = encode(src, out, ae, args.resolution, batch_size=args.batch_size, workers=args.workers)
    elapsed = time.perf_counter() - start
    assert summary.encoded == args.images, summary.lines()
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=64)
    p.add_argument("--distinct", type=int, default=64, help="distinct photos; the other files are copies of them")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--channels", default="64,128,128", help="AutoencoderKL block_out_channels (factor 2^(n-1))")
    p.add_argument("--layers", type=int, default=2, help="layers_per_block")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--vae-dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--repeats", type=int, default=3, help="alternating runs of each; the fastest of each counts")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        make_images(tmp / "images", args.images, args.resolution, args.distinct)
        vae_dir = make_vae(tmp / "vae", tuple(int(c) for c in args.channels.split(",")), args.layers)
        ae = load_autoencoder(vae_dir, device=resolve_device(args.device), dtype=args.vae_dtype)
        decoded = [decode_file(tmp / "images" / f).image for f in scan_images(tmp / "images")]
        pixels = resize_center_crop(decoded, (args.resolution, args.resolution), ae.device)
        batches = list(pixels.split(args.batch_size))
        plain_loop(ae, batches[:1])  # warm-up: first-call allocations and kernel selection
        plain, piped = [], []
        for r in range(args.repeats):
            plain.append(plain_loop(ae, batches))
            piped.append(pipeline(ae, tmp / "images", tmp / f"store{r}", args))
        decoding = decode_only(tmp / "images", args.workers, args.batch_size)

    n, best_plain, best_pipe = args.images, min(plain), min(piped)
    print(f"device {ae.device} ({torch.cuda.get_device_name(ae.device) if ae.device.type == 'cuda' else 'cpu'}), "
          f"torch threads {torch.get_num_threads()}, VAE {args.channels} x{args.layers} {ae.dtype}, "
          f"{n} images at {args.resolution} px, batch {args.batch_size}, workers {args.workers}")
    print(f"plain vae.encode loop: {n / best_plain:8.1f} images/s  (runs: {', '.join(f'{n / t:.1f}' for t in plain)})")
    print(f"encode pipeline:       {n / best_pipe:8.1f} images/s  (runs: {', '.join(f'{n / t:.1f}' for t in piped)})")
    print(f"decoding alone:        {n / decoding:8.1f} images/s  ({args.workers} workers; the pipeline's ceiling)")
    print(f"pipeline / plain time per image: {best_pipe / best_plain:.3f} (best runs), "
          f"{statistics.median(piped) / statistics.median(plain):.3f} (medians); aim <= 1.10")


if __name__ == "__main__":
    main()
