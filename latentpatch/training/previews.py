"""Preview grids during training: a few full-size samples of the EMA, decoded, as one PNG per step."""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import torch

from latentpatch.conditioning import Conditioning
from latentpatch.io import atomic_write_bytes
from latentpatch.sampling.latents import generate_latents
from latentpatch.sampling.options import DEFAULTS
from latentpatch.seeding import image_seed


@torch.no_grad()
def save_preview_grid(
    precond: torch.nn.Module, autoencoder, latent_shape: tuple[int, int, int], path: str | os.PathLike,
    device: torch.device, *, n: int, steps: int, sigma_min: float, sigma_max: float,
    cond: Conditioning | None = None,
) -> None:
    """n samples (EDM Heun) with the images 0..n-1 of a seed-0 `latentpatch sample` job's noise and a fixed
    `cond`, the same at every step, so a run's grids show one set of samples evolve."""
    from torchvision.utils import save_image

    # autocast stays the caller's (the trainer's precision); float32 integration is plenty for a preview
    x = generate_latents(precond, [image_seed(0, i) for i in range(n)], latent_shape,
                         None if cond is None else cond.to(device), sampler=DEFAULTS.sampler, steps=steps,
                         sigma_min=sigma_min, sigma_max=sigma_max, device=device, dtype=torch.float32, autocast=False)
    images = autoencoder.decode(x).float().clamp(-1, 1)
    buf = io.BytesIO()
    save_image((images + 1) / 2, buf, format="png", nrow=max(1, math.ceil(math.sqrt(n))))
    atomic_write_bytes(Path(path), buf.getvalue())
