"""Denoiser networks with the EDM call signature `net(x[B, C+2, h, w], c_noise[B], cond) -> [B, C, h, w]`."""

from __future__ import annotations

import torch
from torch import nn

from latentpatch.errors import UserError
from latentpatch.models.attention import resolve_backend
from latentpatch.models.conditioning import Conditioning
from latentpatch.models.model_config import ModelConfig
from latentpatch.models.presets import apply_preset

__all__ = ["Conditioning", "ModelConfig", "build_network"]


def build_network(
    cfg: ModelConfig, latent_channels: int, *, device: torch.device | str | None = None
) -> nn.Module:
    """Build the denoiser for `latent_channels` latents; `device` is where it will run (picks the
    attention backend once; default CUDA when available), the module itself is returned on the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    backend = resolve_backend(cfg.attention, device)
    if cfg.arch == "dit":
        from latentpatch.models.dit import DiT

        cfg = apply_preset(cfg)
        return DiT(
            latent_channels,
            hidden_size=cfg.hidden_size,
            depth=cfg.depth,
            num_heads=cfg.num_heads,
            patch_size=cfg.patch_size,
            mlp_ratio=cfg.mlp_ratio,
            num_classes=cfg.num_classes,
            text_dim=cfg.text_dim,
            pooled_text_dim=cfg.pooled_text_dim,
            attention_backend=backend,
            grad_checkpointing=cfg.grad_checkpointing,
        )
    if cfg.arch == "unet":
        if cfg.preset is not None:
            raise UserError(f"model.preset={cfg.preset!r} names a DiT size; arch=unet takes no preset")
        from latentpatch.models.unet import UNetDenoiser

        return UNetDenoiser(cfg, latent_channels, backend)
    raise UserError(f"model.arch: unknown architecture {cfg.arch!r}; choose dit or unet")
