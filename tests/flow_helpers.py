"""Tiny flow-matching bases saved as real diffusers pipeline folders, built offline from the library classes:
Stable Diffusion 3 (two CLIP towers with projection + T5, SD3Transformer2DModel), an SD3.5-style variant (qk
norm, a dual-attention block) and FLUX.1 (CLIP pooled + T5, FluxTransformer2DModel; dev-style with the
distilled guidance input, or schnell-style without). Shapes follow the real models where it matters: 16 latent
channels, a VAE with shift and scaling factors, 2x2 tokens, the real scheduler configs. Weights are random
(seeded); what is tested is that latentpatch computes exactly what these models and pipelines compute.

Tokenizers cannot be downloaded: CLIP's comes from open_clip's bundled BPE vocabulary
(pretrained_helpers.write_clip_tokenizer), T5's is a small Unigram model trained here with `tokenizers`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from pretrained_helpers import write_clip_tokenizer

SD3_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)  # stabilityai/stable-diffusion-3(.5) scheduler_config
FLUX_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                      base_image_seq_len=256, max_image_seq_len=4096)  # black-forest-labs/FLUX.1-dev
T5_WIDTH = 48  # joint_attention_dim: T5's d_model (4096 for T5-XXL)
CLIP_WIDTHS = (16, 24)  # CLIP-L's 768 and CLIP-G's 1280, shrunk; SD3 pads their concatenation to T5's width
LATENT_CHANNELS = 16
T5_CORPUS = [
    "a painting of a squirrel eating a burger", "red brick wall", "green grass", "blue gravel", "starry night sky",
    "a photo of a cat sitting on a wooden table", "an astronaut riding a horse on the moon",
    "the quick brown fox jumps over the lazy dog", "a bowl of fruit with apples and oranges",
]


def write_t5_tokenizer(folder: Path, vocab_size: int = 120):
    """A T5TokenizerFast around a Unigram model trained on a few sentences: pad 0, end-of-text 1, unk 2, and
    `</s>` appended to every text, as T5's tokenizer does."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
                                      unk_token="<unk>")
    tok.train_from_iterator(T5_CORPUS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    t5 = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>", extra_ids=0,
                         model_max_length=512)
    folder.mkdir(parents=True, exist_ok=True)
    t5.save_pretrained(folder)
    return T5TokenizerFast.from_pretrained(folder)


def tiny_t5(vocab_size: int):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(4)
    return T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=T5_WIDTH, d_kv=8, d_ff=64, num_layers=2, num_heads=2,
                                   relative_attention_num_buckets=8, dropout_rate=0.0, feed_forward_proj="gated-gelu",
                                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0))


def tiny_clip(width: int, seed: int, projection: bool, pad_token_id: int = 49407):
    """A CLIP text tower on open_clip's BPE vocabulary; with a projection (SD3's towers) or without (FLUX's)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu", projection_dim=width,
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=pad_token_id)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def tiny_flow_vae(shift_factor: float, scaling_factor: float):
    """An AutoencoderKL with 16 latent channels and no quant convs, as SD3's and FLUX's (factor 2 here, 8 there)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(5)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=LATENT_CHANNELS, norm_num_groups=8, sample_size=32, use_quant_conv=False,
                         use_post_quant_conv=False, shift_factor=shift_factor, scaling_factor=scaling_factor)


def tiny_sd3_transformer(sd35: bool = False):
    """SD3Transformer2DModel: patch 2, 16 channels, a 12x12-token position table (SD3-medium: 192x192) around
    a sample_size of 8 latent pixels; `sd35`: SD3.5's RMS qk norm and a dual-attention first block."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(6)
    extra = dict(qk_norm="rms_norm", dual_attention_layers=(0,)) if sd35 else {}
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=LATENT_CHANNELS, num_layers=2,
                                 attention_head_dim=8, num_attention_heads=2, joint_attention_dim=T5_WIDTH,
                                 caption_projection_dim=16, pooled_projection_dim=sum(CLIP_WIDTHS),
                                 out_channels=LATENT_CHANNELS, pos_embed_max_size=12, **extra)


def tiny_flux_transformer(guidance_embeds: bool = True):
    """FluxTransformer2DModel: 16 channels packed 2x2 into 64, one double and two single blocks, rotary axes
    (4, 6, 6) of a 16-wide head; `guidance_embeds`: FLUX.1-dev's distilled guidance input (schnell: none)."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(7)
    return FluxTransformer2DModel(patch_size=1, in_channels=4 * LATENT_CHANNELS, num_layers=1, num_single_layers=2,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=T5_WIDTH,
                                  pooled_projection_dim=CLIP_WIDTHS[0], guidance_embeds=guidance_embeds,
                                  axes_dims_rope=(4, 6, 6))


def _tokenizers(root: Path):
    clip = write_clip_tokenizer(root.parent / f"{root.name}-bpe")
    clip_2 = write_clip_tokenizer(root.parent / f"{root.name}-bpe-2", pad_token="!")  # SD3's CLIP-G pads with "!"
    return clip, clip_2, write_t5_tokenizer(root.parent / f"{root.name}-t5")


def make_sd3_pipeline(root: Path, sd35: bool = False) -> Path:
    """A StableDiffusion3Pipeline folder, saved by diffusers."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    tokenizer, tokenizer_2, tokenizer_3 = _tokenizers(root)
    pipe = StableDiffusion3Pipeline(
        transformer=tiny_sd3_transformer(sd35), scheduler=FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER),
        vae=tiny_flow_vae(0.0609, 1.5305), text_encoder=tiny_clip(CLIP_WIDTHS[0], 8, True), tokenizer=tokenizer,
        text_encoder_2=tiny_clip(CLIP_WIDTHS[1], 9, True, pad_token_id=0), tokenizer_2=tokenizer_2,
        text_encoder_3=tiny_t5(len(tokenizer_3)), tokenizer_3=tokenizer_3)
    pipe.save_pretrained(root)
    return root


def make_flux_pipeline(root: Path, guidance_embeds: bool = True, scaling_factor: float = 0.3611) -> Path:
    """A FluxPipeline folder, saved by diffusers (dev-style by default; schnell-style without guidance input). The
    VAE takes FLUX's shift and scaling factors; the tiny VAE's latents are far smaller than the real one's, so with
    FLUX's 0.3611 they have a std of ~0.12 (a test that needs colours told apart scales them up)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    tokenizer, _, tokenizer_2 = _tokenizers(root)
    pipe = FluxPipeline(
        transformer=tiny_flux_transformer(guidance_embeds), scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
        vae=tiny_flow_vae(0.1159, scaling_factor), text_encoder=tiny_clip(CLIP_WIDTHS[0], 8, False),
        tokenizer=tokenizer,
        text_encoder_2=tiny_t5(len(tokenizer_2)), tokenizer_2=tokenizer_2)
    pipe.save_pretrained(root)
    return root


def load_pipeline(root: Path):
    """The folder loaded back the way a user's folder is: DiffusionPipeline.from_pretrained, float32."""
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(root, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe
