"""The output folder of a generation job: job.json, PNGs with their settings, images.jsonl, grid.png.

Every file appears whole or not at all (temp name + os.replace); images.jsonl is rebuilt from the PNGs'
own text chunks at the start and end of a job, so a kill between a PNG and its index line loses nothing.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from torch import Tensor

from latentpatch.errors import UserError
from latentpatch.io import atomic_write_bytes, write_json_atomic

JOB_FILE = "job.json"
INDEX_FILE = "images.jsonl"
GRID_FILE = "grid.png"
LOCK_FILE = ".lock"
PNG_KEY = "latentpatch"  # the PNG text chunk holding the image's settings as JSON
GRID_MAX = 64


def image_name(index: int) -> str:
    return f"{index:08d}.png"


def image_path(out: Path, index: int) -> Path:
    return out / image_name(index)


def _size_words(size: list[int] | None) -> str:
    return "the run's own" if size is None else f"{size[1]}x{size[0]}"


def _first_difference(old: dict, new: dict) -> str | None:
    """The setting that differs between two job specs, in words, or None when they are the same job."""
    a, b = old.get("settings", {}).get("size"), new["settings"].get("size")
    if a != b:  # said first and in pixels; absent: the run's own shape (job.json as it was before --size)
        return f"--size (was {_size_words(a)}, now {_size_words(b)}; W x H)"
    for key in list(new["settings"]) + [k for k in old.get("settings", {}) if k not in new["settings"]]:
        a, b = old.get("settings", {}).get(key), new["settings"].get(key)
        if a != b:
            return f"{key} (was {a!r}, now {b!r})"
    a_imgs, b_imgs = old.get("images", []), new["images"]
    if len(a_imgs) != len(b_imgs):
        return f"the number of images (was {len(a_imgs)}, now {len(b_imgs)}; --n or the prompts' counts)"
    for a, b in zip(a_imgs, b_imgs):
        for key in ("prompt", "class", "image_seed", "index"):
            if a.get(key) != b.get(key):
                return f"{key} of image {b['index']} (was {a.get(key)!r}, now {b.get(key)!r})"
    return None


def check_or_write_job(out: Path, job: dict) -> None:
    """Write job.json for a new job; for an existing one, refuse different settings, naming the first."""
    path = out / JOB_FILE
    if not path.exists():
        write_json_atomic(path, job)
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not readable JSON ({e}); remove it or pick another --out folder") from e
    diff = _first_difference(old, job)
    if diff is not None:
        raise UserError(
            f"{out} holds a different job: {diff} differs from its {JOB_FILE}. Rerun with the same settings to "
            "resume it, or pick another --out folder"
        )


def done_indices(out: Path, total: int) -> list[int]:
    names = {p.name for p in out.glob("*.png")}
    return [i for i in range(total) if image_name(i) in names]


def to_uint8(images: Tensor) -> Tensor:
    """[B, 3, H, W] in [-1, 1] -> uint8 on the CPU (round to nearest)."""
    return ((images.detach().float().cpu() + 1) * 127.5).round_().clamp_(0, 255).to(torch.uint8)


def to_pil(image: Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def png_bytes(image: Tensor, meta: dict[str, Any] | None = None) -> bytes:
    info = None
    if meta is not None:
        info = PngInfo()
        info.add_text(PNG_KEY, json.dumps(meta))
    buf = io.BytesIO()
    to_pil(image).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def write_png(path: Path, image: Tensor, meta: dict[str, Any]) -> None:
    """uint8 [3, H, W] with its settings in a text chunk, written to a temp name then renamed into place."""
    atomic_write_bytes(path, png_bytes(image, meta))


def read_png_meta(path: Path) -> dict[str, Any]:
    with Image.open(path) as im:
        return json.loads(im.text[PNG_KEY])


def append_index(out: Path, meta: dict[str, Any]) -> None:
    """One line, one write() on an O_APPEND descriptor, so lines of concurrent ranks never interleave."""
    fd = os.open(out / INDEX_FILE, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(meta) + "\n").encode())
    finally:
        os.close(fd)


def rebuild_index(out: Path, total: int) -> None:
    """images.jsonl = one line per finished image, sorted by index; missing lines come from the PNGs."""
    records: dict[int, dict] = {}
    path = out / INDEX_FILE
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            try:
                rec = json.loads(line)
                records[int(rec["index"])] = rec
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by a kill; its PNG still holds the settings
    done = done_indices(out, total)
    lines = [json.dumps(records[i] if i in records else read_png_meta(image_path(out, i))) for i in done]
    atomic_write_bytes(path, "".join(line + "\n" for line in lines).encode())


def _read_uint8(path: Path) -> Tensor:
    with Image.open(path) as im:
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)


def make_grid(images: Tensor, padding: int = 2) -> Tensor:
    """uint8 [N, 3, H, W] -> one image, ceil(sqrt N) per row, black borders."""
    from torchvision.utils import make_grid as tv_make_grid

    return tv_make_grid(images, nrow=math.ceil(math.sqrt(len(images))), padding=padding)


def write_grid(out: Path, total: int, max_images: int = GRID_MAX) -> None:
    """grid.png of the first `max_images` images of the job."""
    images = [_read_uint8(image_path(out, i)) for i in done_indices(out, total)[:max_images]]
    if images:
        atomic_write_bytes(out / GRID_FILE, png_bytes(make_grid(torch.stack(images))))


def read_images(out: Path, total: int, as_tensor: bool) -> list[Image.Image] | Tensor:
    """The job's images back from their PNGs: PIL images, or [N, 3, H, W] float32 in [0, 1]."""
    images = [_read_uint8(image_path(out, i)) for i in range(total)]
    if as_tensor:
        return torch.stack(images).float() / 255
    return [to_pil(img) for img in images]
