"""diffusers UNets behind the EDM call signature: `net(x[B, C+2, h, w], c_noise[B], cond) -> [B, C, h, w]`.

The coordinate channels are plain extra input channels, as in Patch Diffusion's UNets. UNet2DModel serves
unconditional and class-conditional models; UNet2DConditionModel adds cross-attention on text tokens.
"""

from __future__ import annotations

import math

import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.models.attention_processor import Attention, AttnProcessor2_0, XFormersAttnProcessor
from torch import Tensor, nn

from latentpatch.conditioning import Conditioning
from latentpatch.errors import UserError
from latentpatch.models.model_config import ModelConfig, downsampling

PROCESSORS = {"sdpa": AttnProcessor2_0, "xformers": XFormersAttnProcessor}  # diffusers attention backends


def _new_unet(cfg: ModelConfig, latent_channels: int) -> nn.Module:
    """A fresh diffusers UNet from model.unet; coordinates are two extra input channels."""
    u = cfg.unet
    channels, levels = tuple(u.block_out_channels), u.attention_levels
    common = dict(
        in_channels=latent_channels + 2,
        out_channels=latent_channels,
        block_out_channels=channels,
        layers_per_block=u.layers_per_block,
        norm_num_groups=math.gcd(32, *channels),  # GroupNorm's 32 groups, fewer for tiny widths
        num_class_embeds=cfg.num_classes + 1 if cfg.num_classes > 0 else None,
    )
    if cfg.text_dim > 0:
        return UNet2DConditionModel(
            down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in levels),
            up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(levels)),
            cross_attention_dim=cfg.text_dim,
            # diffusers' historical naming: this argument is the number of heads per level.
            attention_head_dim=tuple(max(1, ch // u.attention_head_dim) for ch in channels),
            # pooled text enters the timestep embedding through a linear map (cond_proj)
            time_cond_proj_dim=cfg.pooled_text_dim or None,
            **common,
        )
    return UNet2DModel(
        down_block_types=tuple("AttnDownBlock2D" if a else "DownBlock2D" for a in levels),
        up_block_types=tuple("AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(levels)),
        attention_head_dim=u.attention_head_dim,
        **common,
    )


def _pretrained_unet(cfg: ModelConfig, latent_channels: int) -> nn.Module:
    """The widened pretrained UNet that model.pretrained describes; its text width must be the encoder's."""
    from latentpatch.models.widen import COORD_CHANNELS, check_unet_config, unet_from_config

    config = cfg.pretrained.config
    check_unet_config(config, latent_channels)
    if config.get("in_channels") != latent_channels + COORD_CHANNELS:
        raise UserError(f"model.pretrained.config takes {config.get('in_channels')} input channels; a widened UNet for "
                        f"{latent_channels} latent channels takes {latent_channels + COORD_CHANNELS}")
    conditional = config.get("_class_name") == "UNet2DConditionModel"
    if conditional != (cfg.text_dim > 0) or (conditional and cfg.text_dim != config.get("cross_attention_dim")):
        raise UserError(
            f"model.text_dim={cfg.text_dim} does not fit the pretrained {config.get('_class_name')} "
            f"(cross_attention_dim {config.get('cross_attention_dim')}); use a text encoder of that width"
        )
    if cfg.pooled_text_dim != (config.get("time_cond_proj_dim") or 0):
        raise UserError(f"model.pooled_text_dim={cfg.pooled_text_dim} does not fit the pretrained UNet "
                        f"(time_cond_proj_dim {config.get('time_cond_proj_dim')}); set text.pooled=false")
    return unet_from_config(config)


class UNetDenoiser(nn.Module):
    """A diffusers UNet; the preconditioning's noise input (EDM's c_noise, or a pretrained model's own DDPM
    timestep under edm.precond "vp") goes in as the (float) timestep, labels as class labels (null = num_classes)."""

    def __init__(self, cfg: ModelConfig, latent_channels: int, attention_backend: str) -> None:
        super().__init__()
        self.latent_channels, self.num_classes = latent_channels, cfg.num_classes
        self.text_conditioned = cfg.text_dim > 0
        self.attention_backend = attention_backend
        self.pretrained = cfg.arch == "pretrained"
        if cfg.arch == "pretrained":  # a widened pretrained UNet (latentpatch.models.widen), rebuilt by config
            self.unet = _pretrained_unet(cfg, latent_channels)
        else:
            self.unet = _new_unet(cfg, latent_channels)
        self.size_multiple = downsampling(self.unet.config)
        processor = PROCESSORS[attention_backend]()
        for module in self.unet.modules():  # UNet2DModel has no set_attn_processor; set each layer's
            if isinstance(module, Attention):
                module.set_processor(processor)
        if cfg.grad_checkpointing:
            self.unet.enable_gradient_checkpointing()  # diffusers applies it only while gradients are on

    def forward(self, x: Tensor, c_noise: Tensor, cond: Conditioning | None = None) -> Tensor:
        h, w = x.shape[-2:]
        if h % self.size_multiple or w % self.size_multiple:
            raise UserError(
                f"latent size {h}x{w} is not divisible by {self.size_multiple}, the UNet's total downsampling "
                f"({len(self.unet.config.block_out_channels)} levels); use crop sizes that are multiples of it"
            )
        kwargs: dict[str, Tensor | None] = {}
        if self.num_classes > 0:
            labels = None if cond is None else cond.class_labels
            if labels is None:  # no label given: the null label, i.e. unconditional
                labels = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            kwargs["class_labels"] = labels
        if self.text_conditioned:
            if cond is None or cond.text_tokens is None:
                raise UserError("this model was built with model.text_dim > 0; pass cond.text_tokens")
            if self.unet.config.time_cond_proj_dim and cond.text_pooled is None:
                raise UserError("this model was built with model.pooled_text_dim > 0; pass cond.text_pooled")
            dtype = self.unet.dtype
            kwargs["encoder_hidden_states"] = cond.text_tokens.to(dtype)
            mask = cond.text_mask
            if self.pretrained and mask is not None and bool(mask.all()):
                mask = None  # every position attended, as Stable Diffusion's pipelines call the UNet: exactly that
            kwargs["encoder_attention_mask"] = mask
            pooled = cond.text_pooled if self.unet.config.time_cond_proj_dim else None  # only with cond_proj
            kwargs["timestep_cond"] = None if pooled is None else pooled.to(dtype)
        return self.unet(x, c_noise, return_dict=False, **kwargs)[0]
