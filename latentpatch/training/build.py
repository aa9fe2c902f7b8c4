"""The one place a denoiser is assembled from a RunConfig, so training and loading build the same thing."""

from __future__ import annotations

import torch
from torch import nn

from latentpatch.config import RunConfig
from latentpatch.diffusion.edm import EDMPrecond
from latentpatch.models import build_network


def build_precond(
    cfg: RunConfig, latent_channels: int, *, device: torch.device | str | None = None
) -> EDMPrecond:
    """build_network + EDMPrecond; `device` only picks the attention backend, the module stays on the CPU."""
    return EDMPrecond(build_network(cfg.model, latent_channels, device=device), sigma_data=cfg.edm.sigma_data)


def size_multiple(net: nn.Module) -> int:
    """The side every input must divide into: the DiT patch size, or the UNet's total downsampling."""
    multiple = getattr(net, "size_multiple", None) or getattr(net, "patch_size", None) or 1
    return int(multiple)
