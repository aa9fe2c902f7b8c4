"""Full-size sampling over a denoiser and tensors: per-image seeded noise, the full coordinate grid, guidance
and a sampler -> latents. (Jobs, runs and decoding are latentpatch.sampling.generate's.)

Patch Diffusion samples like any diffusion model: the network sees the whole latent with the full
coordinate grid (Wang et al. 2023, Sec. 3.3), i.e. exactly what a training step with a full-size crop sees.
"""

from __future__ import annotations

import contextlib
from typing import Any, Sequence

import torch
from torch import Tensor

from latentpatch.conditioning import Conditioning
from latentpatch.diffusion.edm import EDMConfig
from latentpatch.diffusion.guidance import guided_denoiser
from latentpatch.diffusion.samplers import KARRAS_RHO, get_sampler, karras_sigmas, per_image_noise_fn
from latentpatch.patches import full_coordinates
from latentpatch.sampling.options import DEFAULTS


@torch.no_grad()
def generate_latents(
    precond: Any,
    seeds: Sequence[int],
    shape: Sequence[int],
    cond: Conditioning | None = None,
    uncond: Conditioning | None = None,
    *,
    sampler: str = DEFAULTS.sampler,
    steps: int = DEFAULTS.steps,
    guidance: float = DEFAULTS.guidance,
    churn: float = DEFAULTS.churn,
    sigma_min: float = EDMConfig.sigma_min,
    sigma_max: float = EDMConfig.sigma_max,
    rho: float = KARRAS_RHO,
    coordinate_scale: str = "per-axis",
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
    autocast: bool | None = None,
    progress: bool = False,
    sigmas: Tensor | None = None,
) -> Tensor:
    """Sample one latent per seed: [len(seeds), *shape] float32 (shape = [C, h, w], any shape the network
    takes) on `device`, the network seeing the full h x w grid normalised as the run's `coordinate_scale`.

    `precond(x, sigma[B], coords[B, 2, h, w], cond) -> D(x)` (EDMPrecond). Noise is drawn on the CPU from
    one generator per seed, so an image does not depend on its batch, and matches across devices up to
    the network's arithmetic. The sampler integrates in `dtype` (float64 like EDM); bf16 autocast on CUDA.
    The settings are the caller's to check (`SampleOptions.check`, or the training config's).
    `sigmas` (1-D, decreasing, ending in 0) replaces the Karras schedule of `steps`, sigma_min, sigma_max and rho:
    a base's own schedule (latentpatch.diffusion.flow_schedule.pipeline_sigmas); x starts as noise * sigmas[0].
    """
    device = torch.device(device)
    c, h, w = (int(s) for s in shape)
    coords = full_coordinates(len(seeds), h, w, device=device, dtype=torch.float32, scale=coordinate_scale)
    use_autocast = device.type == "cuda" if autocast is None else autocast

    def precond_amp(x: Tensor, sigma: Tensor, coords_: Tensor, cond_: Conditioning | None) -> Tensor:
        amp = torch.autocast(device.type, dtype=torch.bfloat16) if use_autocast else contextlib.nullcontext()
        with amp:
            return precond(x, sigma, coords_, cond_)

    denoise = guided_denoiser(precond_amp, coords, cond, uncond, guidance)
    noise_fn = per_image_noise_fn(list(seeds), device="cpu")
    if sigmas is None:
        sigmas = karras_sigmas(steps, sigma_min, sigma_max, rho, device=device)
    else:
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64, device=device)
    x = noise_fn(torch.empty((len(seeds), c, h, w), device=device, dtype=dtype)) * sigmas[0].to(dtype)
    x = get_sampler(sampler)(denoise, x, sigmas, noise_fn=noise_fn, churn=churn, progress=progress)
    return x.to(torch.float32)
