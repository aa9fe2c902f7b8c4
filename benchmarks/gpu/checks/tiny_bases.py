"""Tiny random diffusers networks and the noise schedules of the bases they stand in for (Stable Diffusion 1.x's
scaled-linear PNDM, DiT's linear DDIM), built from the library classes with no download, for check 7."""

from __future__ import annotations

import torch

SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                    skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
DIT_SCHEDULER = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000,
                     clip_sample=False)
TEXT_WIDTH = 32  # the cross-attention width of the tiny UNet (the check feeds random text tokens of this width)


def tiny_sd_unet(channels: int = 4):
    """A two-level UNet2DConditionModel of SD's layout (cross-attention in the lower level), seeded."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(2)
    return UNet2DConditionModel(sample_size=8, in_channels=channels, out_channels=channels, block_out_channels=(16, 32),
                                layers_per_block=1, norm_num_groups=8, cross_attention_dim=TEXT_WIDTH,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=2)


def tiny_dit(channels: int = 4, num_classes: int = 10):
    """A two-layer class-conditional DiTTransformer2DModel with learned sigma (twice the output channels), seeded."""
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(3)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=channels,
                                 out_channels=2 * channels, num_layers=2, sample_size=8, patch_size=2,
                                 num_embeds_ada_norm=num_classes)
