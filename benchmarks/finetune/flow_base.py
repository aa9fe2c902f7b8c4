"""The SD3-shaped base of the flow fine-tune experiment (flow_speed.py), made here: a small
StableDiffusion3Pipeline (SD3's transformer: joint attention over text and image tokens, patch 2, a position table
larger than the image that a crop takes its window from; two CLIP towers with projections and a T5 encoder; SD3's
own flow-matching scheduler; the shipped VAE) with random weights, pretrained by latentpatch on captioned digits at
full size, as SD3 was pretrained on whole images, then saved as a pipeline folder by `lp.export`: the base a user
would start from.

Why this size. A crop carries the whole text sequence (every image token attends to it), so patches pay only
where the image tokens outnumber the text's (docs/benchmarks.md, "What a crop step costs an SD3- or FLUX-shaped
transformer": 0.88 of a full step for SD3-medium at 64x64 latents with its 333 text tokens). Here the tokenizers
keep 16 tokens each (CLIP's model_max_length, T5's max_sequence_length: 32 text tokens) beside 256 image tokens
(128 px, 32x32 latents through the f4 VAE), the proportion of SD3-medium at 1024 px (333 beside 4,096) that a CPU
can train. The T5 tower reads CLIP's BPE vocabulary (tokenizer_3 is a CLIPTokenizer; a T5 SentencePiece model
cannot be downloaded here); the text towers stay random: they only have to tell the captions apart.
"""

from __future__ import annotations

from pathlib import Path

import torch

import latentpatch as lp

from ..speed.arms import FULL
from .captioned import captioned_stores, random_clip
from .channel_runs import Pretraining

SIDE = 128  # pixels; 32 x 32 latents through the shipped f4 VAE, 16 x 16 tokens of patch 2 (half-side crops: 8 x 8)
TEXT_LENGTH = 16  # tokens of each tokenizer (SD3: CLIP's 77, T5's 256)
CLIP_WIDTHS = (32, 64)  # CLIP-L's 768 and CLIP-G's 1280, shrunk; pooled: their concatenation, 96
T5_WIDTH = 128  # joint_attention_dim (T5-XXL: 4096); SD3 pads the CLIP tokens (96 wide) to it
# SD3-medium's transformer, small: 24 blocks of width 1536 (24 heads of 64) -> 4 of width 128 (4 heads of 32), patch
# 2, a 48 x 48 position table around the 16 x 16 image grid (SD3-medium: 192 around 64 at 1024 px).
TRANSFORMER = dict(sample_size=SIDE // 4, patch_size=2, in_channels=4, out_channels=4, num_layers=4,
                   attention_head_dim=32, num_attention_heads=4, joint_attention_dim=T5_WIDTH,
                   caption_projection_dim=128, pooled_projection_dim=sum(CLIP_WIDTHS), pos_embed_max_size=48)
SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)  # stabilityai/stable-diffusion-3-medium scheduler_config
TEXT = [f"text.max_length={TEXT_LENGTH}"]  # every run on these stores: T5's sequence length as encoded


def random_t5(seed: int) -> torch.nn.Module:
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(T5Config(vocab_size=49408, d_model=T5_WIDTH, d_kv=32, d_ff=2 * T5_WIDTH, num_layers=2,
                                   num_heads=4, relative_attention_num_buckets=8, dropout_rate=0.0,
                                   feed_forward_proj="gated-gelu", pad_token_id=49407, eos_token_id=49407,
                                   decoder_start_token_id=0))


def random_base(folder: Path) -> Path:
    """The untrained StableDiffusion3Pipeline folder: what is pretrained below."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from diffusers import StableDiffusion3Pipeline
    from open_clip.tokenizer import SimpleTokenizer

    from latentpatch.autoencoders.loading import builtin_folder
    from latentpatch.exporting.text import clip_tokenizer

    if (folder / "model_index.json").is_file():
        return folder
    tokenizer = clip_tokenizer(SimpleTokenizer(), TEXT_LENGTH)
    torch.manual_seed(0)
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**TRANSFORMER), scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
        vae=AutoencoderKL.from_pretrained(builtin_folder(), shift_factor=0.0),  # SD3's pipeline reads a shift
        text_encoder=random_clip(CLIP_WIDTHS[0], 1, True), tokenizer=tokenizer,
        text_encoder_2=random_clip(CLIP_WIDTHS[1], 2, True), tokenizer_2=tokenizer,
        text_encoder_3=random_t5(3), tokenizer_3=tokenizer)
    pipe.save_pretrained(folder)
    return folder


def stores(root: Path, base: Path, parts: tuple[str, ...], every: int = 1) -> dict[str, Path]:
    """The captioned digits (every `every`-th) or faces (captioned.captioned_stores' `parts`) at SIDE px through the
    pipeline `base`'s VAE and its three text towers, TEXT_LENGTH tokens each."""
    from latentpatch.text.loader import load_text_encoder

    text = load_text_encoder(f"transformers:{base}", max_length=TEXT_LENGTH, device="cpu")
    return captioned_stores(root, base, SIDE, text, every, parts)


def pretrain(folder: Path, data: dict[str, Path], out: Path, plan: Pretraining) -> Path:
    """The base: the random pipeline trained on the digits at full size, caption dropout for guidance, TEXT_LENGTH
    tokens (Pretraining.run)."""
    return plan.run(folder, data, out, [*FULL, "train.label_dropout=0.1", *TEXT])


def base_pipeline(run: Path, folder: Path) -> Path:
    """The pretrained base as the pipeline folder a user would fine-tune (`lp.export` of its BEST EMA weights: the
    stock StableDiffusion3Pipeline)."""
    if not (folder / "model_index.json").is_file():
        lp.export(run, folder)
    return folder
