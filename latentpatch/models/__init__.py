"""Denoiser networks with the EDM call signature `net(x[B, C+2, h, w], c_noise[B], cond) -> [B, C, h, w]`."""

from __future__ import annotations

import torch
from torch import nn

from latentpatch.device import resolve_device
from latentpatch.models.attention import resolve_backend
from latentpatch.models.model_config import FLOW_CLASSES, DiTConfig, ModelConfig, PretrainedConfig, UNetConfig
from latentpatch.models.sdxl import is_sdxl_unet

__all__ = ["DiTConfig", "ModelConfig", "PretrainedConfig", "UNetConfig", "build_network"]


def build_network(
    cfg: ModelConfig, latent_channels: int, *, device: torch.device | str | None = None
) -> nn.Module:
    """Build the denoiser for `latent_channels` latents; `device` is where it will run (picks the
    attention backend once; default CUDA when available), the module itself is returned on the CPU."""
    backend = resolve_backend(cfg.attention, resolve_device(device) if device is None else device)
    if cfg.arch == "dit":
        from latentpatch.models.dit import DiT

        d = cfg.dit
        return DiT(
            latent_channels,
            hidden_size=d.hidden_size,
            depth=d.depth,
            num_heads=d.num_heads,
            patch_size=d.patch_size,
            mlp_ratio=d.mlp_ratio,
            num_classes=cfg.num_classes,
            text_dim=cfg.text_dim,
            pooled_text_dim=cfg.pooled_text_dim,
            attention_backend=backend,
            grad_checkpointing=cfg.grad_checkpointing,
        )
    if cfg.arch == "pretrained" and cfg.pretrained.class_name == "DiTTransformer2DModel":
        from latentpatch.models.pretrained_dit import PretrainedDiT

        return PretrainedDiT(cfg, latent_channels, backend)
    if cfg.arch == "pretrained" and cfg.pretrained.class_name in FLOW_CLASSES:
        from latentpatch.models.flow_base import flow_network

        return flow_network(cfg, latent_channels)
    if cfg.arch == "pretrained" and is_sdxl_unet(cfg.pretrained.config):
        from latentpatch.models.sdxl import sdxl_network

        return sdxl_network(cfg, latent_channels, backend)
    from latentpatch.models.unet import UNetDenoiser

    return UNetDenoiser(cfg, latent_channels, backend)
