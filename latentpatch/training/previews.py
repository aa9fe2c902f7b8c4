"""Preview grids during training: a few full-size samples of the EMA, decoded, as one PNG per step."""

from __future__ import annotations

import io
import os
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from latentpatch.conditioning import Conditioning
from latentpatch.io import atomic_write_bytes
from latentpatch.sampling.job_folder import make_grid, to_pil, to_uint8
from latentpatch.sampling.latents import generate_latents
from latentpatch.sampling.options import DEFAULTS
from latentpatch.seeding import image_seed


@torch.no_grad()
def save_preview_grid(
    precond: torch.nn.Module, autoencoder, latent_shape: tuple[int, int, int], path: str | os.PathLike,
    device: torch.device, *, n: int, steps: int, sigma_min: float, sigma_max: float,
    cond: Conditioning | None = None, label: str | None = None, coordinate_scale: str = "per-axis",
    sigmas: torch.Tensor | None = None,
) -> None:
    """n samples (EDM Heun) with the images 0..n-1 of a seed-0 `latentpatch sample` job's noise and a fixed
    `cond`, the same at every step, so a run's grids show one set of samples evolve; `label` (the step and its
    held-out loss) is written in a strip above the grid, so a grid opened alone says where it stands."""
    # autocast stays the caller's (the trainer's precision); float32 integration is plenty for a preview
    x = generate_latents(precond, [image_seed(0, i) for i in range(n)], latent_shape,
                         None if cond is None else cond.to(device), sampler=DEFAULTS.sampler, steps=steps,
                         sigma_min=sigma_min, sigma_max=sigma_max, device=device, dtype=torch.float32, autocast=False,
                         coordinate_scale=coordinate_scale, sigmas=sigmas)
    picture = to_pil(make_grid(to_uint8(autoencoder.decode(x))))  # as `sample` writes its images and grid.png
    if label:
        picture = labelled(picture, label)
    buf = io.BytesIO()
    picture.save(buf, format="png")
    atomic_write_bytes(Path(path), buf.getvalue())


def preview_label(step: int, heldout=None) -> str:
    """What a preview grid is labelled with: its step and, when `heldout` (training.heldout.HeldoutEval) evaluated
    there, the held-out loss."""
    if heldout is not None and heldout.last_step == step and heldout.last_loss is not None:
        return f"step {step}  held-out {heldout.last_loss:.4f}"
    return f"step {step}"


def labelled(picture: Image.Image, label: str) -> Image.Image:
    """`picture` under a white strip with `label` in PIL's built-in font (no font file needed)."""
    font = ImageFont.load_default()
    left, top, right, bottom = ImageDraw.Draw(picture).textbbox((0, 0), label, font=font)
    strip = bottom - top + 6
    out = Image.new("RGB", (max(picture.width, right - left + 6), picture.height + strip), "white")
    out.paste(picture.convert("RGB"), (0, strip))
    ImageDraw.Draw(out).text((3 - left, 3 - top), label, fill="black", font=font)
    return out
