"""Resize-and-centre-crop on the device, a batch at a time: the images' shorter side is scaled to cover the
target size (with antialiasing) and the middle is cut out, as ADM/LDM preprocess their training images.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import torch
import torchvision.transforms.v2.functional as TF
from torchvision.transforms import InterpolationMode

from latentpatch.errors import UserError


def as_size(resolution: int | Sequence[int]) -> tuple[int, int]:
    """`R` or `(H, W)` -> `(H, W)`, both positive."""
    size = (resolution, resolution) if isinstance(resolution, int) else tuple(int(r) for r in resolution)
    if len(size) != 2 or min(size) <= 0:
        raise UserError(f"resolution must be a positive size, got {resolution}")
    return size  # type: ignore[return-value]


def check_resolution(size: tuple[int, int], factor: int) -> None:
    """Latents are `size / factor` pixels across, so the size must divide exactly."""
    if size[0] % factor or size[1] % factor:
        shown = size[0] if size[0] == size[1] else f"{size[0]}x{size[1]}"
        raise UserError(
            f"resolution {shown} is not a multiple of the autoencoder's factor {factor}; "
            f"use a multiple of {factor}, e.g. {max(factor, size[0] // factor * factor)}"
        )


def covers(height: int, width: int, size: tuple[int, int]) -> bool:
    """True if the image reaches the target size without upscaling."""
    return height >= size[0] and width >= size[1]


def cover_size(height: int, width: int, size: tuple[int, int]) -> tuple[int, int]:
    """Smallest scaled size, aspect kept, that covers `size` (for a square target: shorter side = R)."""
    scale = max(size[0] / height, size[1] / width)
    return max(size[0], round(height * scale)), max(size[1], round(width * scale))


def resize_center_crop(
    images: Sequence[torch.Tensor], size: tuple[int, int], device: torch.device | str = "cpu"
) -> torch.Tensor:
    """uint8 [3, h_i, w_i] images of any sizes -> float32 [B, 3, H, W] in [-1, 1] on `device`.

    Images of one size are resized together; bicubic with antialias, clamped because bicubic overshoots.
    Pinned inputs are copied to the device asynchronously.
    """
    out = torch.empty(len(images), 3, *size, device=device, dtype=torch.float32)
    groups: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, image in enumerate(images):
        groups[(image.shape[-2], image.shape[-1])].append(i)
    for (h, w), idx in groups.items():
        batch = torch.stack([images[i].to(device, non_blocking=True) for i in idx]).float()
        if (h, w) != size:
            batch = TF.resize(batch, list(cover_size(h, w, size)), InterpolationMode.BICUBIC, antialias=True)
            batch = TF.center_crop(batch, list(size)).clamp_(0, 255)
        out[torch.tensor(idx, device=device)] = batch
    return out.div_(127.5).sub_(1.0)
