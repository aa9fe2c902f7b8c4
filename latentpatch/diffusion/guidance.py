"""Classifier-free guidance (Ho & Salimans 2022): D = D_u + w * (D_c - D_u), in one batched network call."""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from latentpatch.conditioning import Conditioning, cat_conditioning
from latentpatch.errors import UserError

# The EDMPrecond call signature: (x, sigma[B], coords[B, 2, h, w], cond) -> D(x)
PrecondFn = Callable[[Tensor, Tensor, Tensor, Optional[Conditioning]], Tensor]


def guided(
    precond: PrecondFn,
    x: Tensor,
    sigma: Tensor,
    coords: Tensor,
    cond: Conditioning | None,
    uncond_cond: Conditioning | None,
    scale: float,
) -> Tensor:
    """D_u + scale * (D_c - D_u); scale 1 is the conditional model alone and scale 0 the unconditional one,
    each with a single call. Otherwise cond and uncond go through the network as one batch of 2B.
    """
    if scale == 1:
        return precond(x, sigma, coords, cond)
    if cond is None or uncond_cond is None:
        raise UserError(
            f"guidance scale {scale} needs a conditional model with both a condition and its unconditional "
            "(null) counterpart; use scale 1 for an unconditional model"
        )
    if scale == 0:
        return precond(x, sigma, coords, uncond_cond)
    sigma = torch.as_tensor(sigma, device=x.device).reshape(-1).expand(x.shape[0])
    D = precond(
        torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([coords, coords]), cat_conditioning(uncond_cond, cond)
    )
    D_u, D_c = D.chunk(2)
    return D_u + scale * (D_c - D_u)


def guided_denoiser(
    precond: PrecondFn,
    coords: Tensor,
    cond: Conditioning | None = None,
    uncond_cond: Conditioning | None = None,
    scale: float = 1.0,
) -> Callable[[Tensor, Tensor], Tensor]:
    """Bind coordinates and conditioning into the `denoise(x, sigma[B])` that every sampler takes."""

    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        return guided(precond, x, sigma, coords, cond, uncond_cond, scale)

    return denoise
