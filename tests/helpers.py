"""Tiny test data made from the photos scikit-image ships: image folders and a random VAE, no downloads."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")
FORMATS = ("png", "jpg", "webp", "bmp", "tiff")
_PIL_FORMAT = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP", "bmp": "BMP", "tif": "TIFF", "tiff": "TIFF"}
# Modes each format stores and reads back unchanged (checked with Pillow); TIFF keeps them all.
KEEPS_MODE = {
    "png": ("RGB", "L", "P", "RGBA", "LA", "1", "I;16"), "jpg": ("RGB", "L", "CMYK"), "webp": ("RGB", "RGBA"),
    "bmp": ("RGB", "L", "P", "1"),
}


@lru_cache(maxsize=None)
def _photo_array(name: str) -> np.ndarray:
    import skimage.data

    if name == "lfw":
        return skimage.data.lfw_subset()[0]
    return getattr(skimage.data, name)()


def photo(index: int = 0, size: int | tuple[int, int] = 48) -> Image.Image:
    """An RGB photo crop of `size` (side or (width, height)); `index` picks the photo and the crop offset."""
    w, h = (size, size) if isinstance(size, int) else size
    array = _photo_array(PHOTOS[index % len(PHOTOS)])
    im = Image.fromarray(array).convert("RGB")
    # A different crop for each index, keeping the target aspect, so images differ even for one photo.
    side_w, side_h = (im.width, round(im.width * h / w)) if im.width * h / w <= im.height else (round(im.height * w / h), im.height)
    shift = (index // len(PHOTOS)) * 7
    left, top = min(shift, im.width - side_w), min(shift, im.height - side_h)
    return im.crop((left, top, left + side_w, top + side_h)).resize((w, h), Image.Resampling.LANCZOS)


def save_image(image: Image.Image, path: str | Path, mode: str | None = None) -> Path:
    """Save `image` converted to `mode` ("RGB", "L", "P", "RGBA", ...) in the format of the path's extension.

    RGBA images get a transparent left quarter, so alpha handling is visible.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if mode == "RGBA":
        image = image.convert("RGBA")
        alpha = np.full((image.height, image.width), 255, np.uint8)
        alpha[:, : image.width // 4] = 0
        image.putalpha(Image.fromarray(alpha))
    elif mode == "P":
        image = image.convert("RGB").quantize(colors=64)
    elif mode is not None:
        image = image.convert(mode)
    fmt = _PIL_FORMAT[path.suffix.lower().lstrip(".")]
    image.save(path, fmt, **({"quality": 95} if fmt in ("JPEG", "WEBP") else {}))
    return path


def make_image_folder(
    path: str | Path,
    n: int = 8,
    size: int | tuple[int, int] | Sequence[int | tuple[int, int]] = 48,
    *,
    formats: Sequence[str] = FORMATS,
    modes: Sequence[str] = ("RGB",),
    start: int = 0,
    prefix: str = "img",
) -> list[Path]:
    """Write `n` images named PREFIX_NNN.EXT into `path`, cycling through sizes, formats and modes.

    `size` may be a list to vary sizes; `start` offsets names and photo crops so folders can be extended.
    A mode the cycled format cannot keep (P as JPEG, say) is written as TIFF instead, so every file reads
    back in the mode asked for.
    """
    sizes = list(size) if isinstance(size, (list, tuple)) and not _is_size_pair(size) else [size]
    paths = []
    for k in range(start, start + n):
        fmt, mode = formats[k % len(formats)], modes[k % len(modes)]
        if mode not in KEEPS_MODE.get(fmt, (mode,)):
            fmt = "tiff"
        image = photo(k, sizes[k % len(sizes)])
        paths.append(save_image(image, Path(path) / f"{prefix}_{k:03d}.{fmt}", mode))
    return paths


def _is_size_pair(size) -> bool:
    return isinstance(size, tuple) and len(size) == 2 and all(isinstance(s, int) for s in size)


def make_tiny_kl_vae(path: str | Path, seed: int = 0, latent_channels: int = 4, scaling_factor: float = 0.5) -> Path:
    """Save a random 2-level AutoencoderKL (factor 2) with save_pretrained; returns the folder."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(
        block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=latent_channels, norm_num_groups=8,
        sample_size=32, scaling_factor=scaling_factor,
    )
    vae.save_pretrained(path)
    return Path(path)


def run_main(monkeypatch, capsys, *args) -> tuple[int, str, str]:
    """The `latentpatch` console entry point in this process, as a user runs it: (exit code, stdout, stderr)."""
    import sys

    import pytest

    from latentpatch.cli.app import main

    monkeypatch.setattr(sys, "argv", ["latentpatch", *map(str, args)])
    with pytest.raises(SystemExit) as exit_info:
        main()
    out = capsys.readouterr()
    return exit_info.value.code or 0, out.out, out.err


def verify_store(store) -> None:
    """Every shard file of a LatentStore matches the sha256 its manifest records (reads everything)."""
    import hashlib

    from latentpatch.data.manifest import SHARD_DIR

    for record in store.manifest.shards:
        path = store.path / SHARD_DIR / record.file
        found = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else None
        assert found == record.sha256, f"{path} is missing or differs from the manifest's sha256"


def stored_count(out: Path) -> int:
    """Items the store's manifest counts (0 while it is not there or half written): how far an encode is."""
    import json

    try:
        return json.loads((Path(out) / "manifest.json").read_text())["count"]
    except (OSError, ValueError, KeyError):
        return 0


def train_two_processes(store: Path, out: Path, overrides: Sequence[str]):
    """`latentpatch train --config tiny` on 2 gloo processes (torchrun); returns the finished process."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "latentpatch.cli", "train", "--latents", str(store), "--config", "tiny",
           "--out", str(out), "--device", "cpu", "--no-progress", *overrides]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def encode_killed_midway(args: Sequence, out: Path, rows: int = 4, while_running=None) -> int:
    """`latentpatch encode *args` run by tests/slow_cli.py (a pause after each batch), SIGKILLed once the
    store holds `rows` items (`while_running()` is called just before); returns the process's return code."""
    import signal
    import subprocess
    import sys
    import time

    slow_cli = Path(__file__).with_name("slow_cli.py")
    slow = subprocess.Popen([sys.executable, str(slow_cli), "0.25", "encode", *map(str, args)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 90
        while stored_count(out) < rows and time.monotonic() < deadline and slow.poll() is None:
            time.sleep(0.05)
        if while_running is not None:
            while_running()
        slow.send_signal(signal.SIGKILL)
        slow.wait(timeout=30)
    finally:
        if slow.poll() is None:
            slow.kill()
    return slow.returncode
