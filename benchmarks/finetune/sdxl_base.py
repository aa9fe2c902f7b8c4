"""The SDXL base of the channels experiment, made here: a small StableDiffusionXLPipeline (SDXL's UNet shape: three
levels, no attention on the first, text_time added conditioning of 6 time ids beside the pooled text; two CLIP
towers, the second with its projection; SDXL's own scheduler; the shipped VAE) with random weights, pretrained by
latentpatch on captioned MNIST digits with the default patch schedule, each crop told its place through the time
ids alone (as SDXL was pretrained on random crops told through them), so the base has learnt to read them. The
channels arm starts from it with its conv_in widened by two zero-initialised inputs (experiment.widened_copy).

The fine-tune data is another domain, faces, which the base denoises far worse than digits: a fine-tune has
something to learn, and where it learns the crop's place may matter (a face's top half is not its bottom half).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .captioned import captioned_stores, random_clip
from .channel_runs import Pretraining

SIDE = 64  # pixels; the shipped VAE's f4 latents are 16 x 16 (half-side crops 8 x 8: multiples of the UNet's 4)
CLIP_WIDTHS = (32, 64)  # CLIP ViT-L's 768 and OpenCLIP ViT-bigG's 1280, shrunk: tokens 96 wide, pooled 64
TIME_DIM = 16  # addition_time_embed_dim (SDXL: 256)
# SDXL's UNet, small: levels (320, 640, 1280) -> (32, 64, 64), transformer depth (0, 2, 10) -> (0, 1, 1), one resnet
# per level (SDXL: 2), linear projections, heads of 32 channels (SDXL: 64); 1.75M parameters.
UNET = dict(sample_size=SIDE // 4, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=1,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(1, 2, 2),
            transformer_layers_per_block=(0, 1, 1), cross_attention_dim=sum(CLIP_WIDTHS), use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=TIME_DIM,
            projection_class_embeddings_input_dim=6 * TIME_DIM + CLIP_WIDTHS[1])
# stabilityai/stable-diffusion-xl-base-1.0 scheduler_config.json
SDXL_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                      steps_offset=1, timestep_spacing="leading", interpolation_type="linear", use_karras_sigmas=False,
                      prediction_type="epsilon")


def random_base(folder: Path) -> Path:
    """The untrained StableDiffusionXLPipeline folder: what is pretrained below (its text towers stay random: they
    only need to tell the captions apart)."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from open_clip.tokenizer import SimpleTokenizer

    from latentpatch.autoencoders.loading import builtin_folder
    from latentpatch.exporting.text import clip_tokenizer

    if (folder / "model_index.json").is_file():
        return folder
    tokenizer = clip_tokenizer(SimpleTokenizer(), 77)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**UNET)
    pipe = StableDiffusionXLPipeline(
        vae=AutoencoderKL.from_pretrained(builtin_folder()), text_encoder=random_clip(CLIP_WIDTHS[0], 1, False),
        text_encoder_2=random_clip(CLIP_WIDTHS[1], 2, True), tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER), add_watermarker=False)
    pipe.save_pretrained(folder)
    return folder


def stores(root: Path, base: Path) -> dict[str, Path]:
    """The captioned digits and faces (captioned.captioned_stores) through the base pipeline's VAE and text
    encoders, SDXL's 77 tokens."""
    from latentpatch.text.loader import load_text_encoder

    text = load_text_encoder(f"transformers:{base}", layer="last", padding="pipeline", max_length=77, device="cpu")
    return captioned_stores(root, base, SIDE, text)


def pretrain(folder: Path, data: dict[str, Path], out: Path, plan: Pretraining) -> Path:
    """The base: the random pipeline trained on the digits with the default patch schedule (half-side crops in
    half the steps), each crop's place in the time ids alone; caption dropout for guidance (Pretraining.run)."""
    return plan.run(folder, data, out, ["train.label_dropout=0.1"])

