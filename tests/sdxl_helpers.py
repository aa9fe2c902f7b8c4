"""Tiny SDXL pipelines saved as real diffusers pipeline folders, built offline from the library classes: a
UNet2DConditionModel with SDXL's added conditioning (text_time: 6 time ids beside the pooled text), CLIP-L-style and
CLIP-G-style towers (the second with its projection, its tokenizer padding with "!", as SDXL's), a VAE and SDXL's
EulerDiscreteScheduler config; an eps base, or a v-prediction one with zero terminal SNR. Weights are random
(seeded); what is tested is that latentpatch computes exactly what these models and the pipeline compute.
"""

from __future__ import annotations

from pathlib import Path

import torch
from flow_helpers import tiny_clip
from pretrained_helpers import tiny_vae, write_clip_tokenizer

# stabilityai/stable-diffusion-xl-base-1.0 scheduler_config.json
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      steps_offset=1, timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False,
                      prediction_type="epsilon")
# a v-prediction fine-tune with zero terminal SNR (Lin et al. 2024): rescaled betas, trailing timesteps
ZSNR_SCHEDULER = {**SDXL_SCHEDULER, "prediction_type": "v_prediction", "rescale_betas_zero_snr": True,
                  "timestep_spacing": "trailing"}
CLIP_WIDTHS = (16, 24)  # CLIP ViT-L's 768 and OpenCLIP ViT-bigG's 1280, shrunk: tokens 16 + 24 = 40 wide
TIME_DIM = 8  # addition_time_embed_dim (SDXL: 256)
LATENT_CHANNELS = 4


def tiny_sdxl_unet(seed: int = 11, channels: tuple[int, ...] = (16, 32)):
    """SDXL's UNet shape, shrunk: a plain first level, cross-attention (linear projections, 2 transformer layers)
    below, text_time added conditioning of 6 time ids and CLIP-G's pooled width."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS, block_out_channels=channels,
        layers_per_block=1, norm_num_groups=8, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
        cross_attention_dim=sum(CLIP_WIDTHS), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=TIME_DIM, projection_class_embeddings_input_dim=6 * TIME_DIM + CLIP_WIDTHS[1])


def make_sdxl_pipeline(root: Path, scheduler: dict | None = None, unet=None) -> Path:
    """A StableDiffusionXLPipeline folder, saved by diffusers (force_zeros_for_empty_prompt, as SDXL base's)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tokenizer = write_clip_tokenizer(root.parent / f"{root.name}-bpe")
    tokenizer_2 = write_clip_tokenizer(root.parent / f"{root.name}-bpe-2", pad_token="!")
    pipe = StableDiffusionXLPipeline(
        vae=tiny_vae(), text_encoder=tiny_clip(CLIP_WIDTHS[0], 8, False),
        text_encoder_2=tiny_clip(CLIP_WIDTHS[1], 9, True, pad_token_id=0), tokenizer=tokenizer, tokenizer_2=tokenizer_2,
        unet=unet if unet is not None else tiny_sdxl_unet(),
        scheduler=EulerDiscreteScheduler(**(scheduler or SDXL_SCHEDULER)), add_watermarker=False)
    pipe.save_pretrained(root)
    return root
