"""Tiny pretrained bases saved as real diffusers pipeline folders, built offline from the library classes:
a Stable-Diffusion-style pipeline (unet/, scheduler/, vae/, text_encoder/, tokenizer/) and a DiT pipeline
(transformer/, scheduler/, vae/). Weights are random (seeded); what is tested is that latentpatch computes
exactly what these models and their schedulers compute."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from text_helpers import COLOURS

SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000,
                    skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
DIT_SCHEDULER = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000,
                     clip_sample=False)
TEXT_WIDTH = 32


def tiny_vae():
    """A random AutoencoderKL (factor 2, 4 channels) made usable as a latent space: a near-deterministic
    posterior (log-variance -12) and the scaling factor that gives solid colours unit-variance latents, as
    SD's 0.18215 does for its VAE."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                        latent_channels=4, norm_num_groups=8, sample_size=16)
    with torch.no_grad():
        vae.quant_conv.weight[4:] = 0
        vae.quant_conv.bias[4:] = -12.0
        colours = torch.rand(16, 3, 1, 1, generator=torch.Generator().manual_seed(0)).expand(16, 3, 16, 16)
        std = vae.encode(colours * 2 - 1).latent_dist.mean.std()
    vae.register_to_config(scaling_factor=round(float(1 / std), 4))
    return vae


def write_clip_tokenizer(folder: Path, pad_token: str = "<|endoftext|>"):
    """A CLIPTokenizer from open_clip's bundled BPE vocabulary (the same vocabulary as OpenAI CLIP)."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    tok = SimpleTokenizer()
    names = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {names.get(k, k): v for k, v in tok.encoder.items()}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    merges = sorted(tok.bpe_ranks.items(), key=lambda kv: kv[1])
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for (a, b), _ in merges))
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token,
                         model_max_length=77)


def tiny_clip_text_model(layers: int = 2, act: str = "quick_gelu"):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(1)
    return CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=TEXT_WIDTH, intermediate_size=64,
                                        num_hidden_layers=layers, num_attention_heads=2, max_position_embeddings=77,
                                        hidden_act=act, bos_token_id=49406, eos_token_id=49407, pad_token_id=49407))


def tiny_sd_unet(channels: int = 4):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(2)
    return UNet2DConditionModel(sample_size=8, in_channels=channels, out_channels=channels, block_out_channels=(16, 32),
                                layers_per_block=1, norm_num_groups=8, cross_attention_dim=TEXT_WIDTH,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=2)


def make_sd_pipeline(root: Path, prediction_type: str = "epsilon") -> Path:
    """A StableDiffusionPipeline folder (PNDM scheduler with SD's scaled-linear betas), saved by diffusers."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    tokenizer = write_clip_tokenizer(root.parent / f"{root.name}-bpe")
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=tiny_clip_text_model(), tokenizer=tokenizer,
                                   unet=tiny_sd_unet(), scheduler=PNDMScheduler(**SD_SCHEDULER,
                                                                                prediction_type=prediction_type),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(root)
    return root


def make_pixel_sd_pipeline(root: Path, prediction_type: str = "v_prediction") -> Path:
    """unet/ (3 channels), scheduler/, text_encoder/, tokenizer/ and no vae/: fine-tuned with vae="pixel", so
    a sample's colour can be read off its pixels."""
    from diffusers import PNDMScheduler

    tiny_sd_unet(3).save_pretrained(root / "unet")
    PNDMScheduler(**SD_SCHEDULER, prediction_type=prediction_type).save_pretrained(root / "scheduler")
    tiny_clip_text_model().save_pretrained(root / "text_encoder")
    write_clip_tokenizer(root.parent / f"{root.name}-bpe").save_pretrained(root / "tokenizer")
    return root


def tiny_dit(channels: int = 4, num_classes: int = 10):
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(3)
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=channels,
                                 out_channels=2 * channels, num_layers=2, sample_size=8, patch_size=2,
                                 num_embeds_ada_norm=num_classes)


def make_dit_pipeline(root: Path, num_classes: int = 10) -> Path:
    """A DiTPipeline folder: learned-sigma DiT (8 output channels for 4 latent ones), DDIM scheduler. DiTPipeline's
    own null label is 1000: guidance in it needs num_classes=1000, DiT-XL/2's."""
    from diffusers import DDIMScheduler, DiTPipeline

    DiTPipeline(transformer=tiny_dit(num_classes=num_classes), vae=tiny_vae(),
                scheduler=DDIMScheduler(**DIT_SCHEDULER)).save_pretrained(root)
    return root


def widen_dit_base(found) -> None:
    """A DiT base (starting_points.FinetuneBase) as latentpatch fine-tuned DiTs before it kept them stock: the patch
    embedding widened by the two coordinate channels with zero weights, in_channels C+2 in the config. Runs
    written so must still load, sample and export."""
    from latentpatch.models.widen import COORD_CHANNELS

    key = "net.transformer.pos_embed.proj.weight"
    weight = found.state[key]
    zeros = weight.new_zeros(weight.shape[0], COORD_CHANNELS, *weight.shape[2:])
    found.state[key] = torch.cat([weight, zeros], dim=1)
    config = found.cfg.model.pretrained.config
    config["in_channels"] = weight.shape[1] + COORD_CHANNELS


def make_pixel_dit_pipeline(root: Path) -> Path:
    """transformer/ (3 channels, learned sigma) and scheduler/, no vae/: fine-tuned with vae="pixel"."""
    from diffusers import DDIMScheduler

    tiny_dit(3).save_pretrained(root / "transformer")
    DDIMScheduler(**DIT_SCHEDULER).save_pretrained(root / "scheduler")
    return root


def labelled_colour_folder(root: Path, n: int = 24, size: int = 16, seed: int = 0) -> Path:
    """Noisy solid-colour images in class subfolders red/, green/, blue/ (`encode --labels folders`: sorted
    names, so blue=0, green=1, red=2)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        name = list(COLOURS)[i % 3]
        rgb = rng.uniform(0.0, 0.3, size=3)
        rgb[COLOURS[name]] = rng.uniform(0.6, 1.0)
        pixels = np.clip(rgb + rng.normal(0, 0.05, size=(size, size, 3)), 0, 1)
        (root / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray((pixels * 255).astype(np.uint8)).save(root / name / f"{i:03d}.png")
    return root


def with_prediction_type(pipeline: Path, root: Path, prediction_type: str) -> Path:
    """A copy of `pipeline` whose scheduler says `prediction_type` (the same weights read another way)."""
    import shutil

    shutil.copytree(pipeline, root)
    path = root / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "prediction_type": prediction_type}))
    return root


def clip_text_model_from_open_clip(clip, layers: int, act: str):
    """transformers CLIPTextModel holding the first `layers` blocks of an open_clip text tower (how Stable
    Diffusion 2.x's text_encoder/ was converted from OpenCLIP ViT-H/14: its last block dropped)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    width = clip.token_embedding.weight.shape[1]
    blocks = clip.transformer.resblocks
    config = CLIPTextConfig(vocab_size=clip.token_embedding.weight.shape[0], hidden_size=width,
                            intermediate_size=blocks[0].mlp.c_fc.out_features, num_hidden_layers=layers,
                            num_attention_heads=blocks[0].attn.num_heads, max_position_embeddings=77,
                            hidden_act=act, bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
    model = CLIPTextModel(config).eval()
    tm = getattr(model, "text_model", model)  # transformers 4 nests the tower; 5 does not
    with torch.no_grad():
        tm.embeddings.token_embedding.weight.copy_(clip.token_embedding.weight)
        tm.embeddings.position_embedding.weight.copy_(clip.positional_embedding)
        for layer, block in zip(tm.encoder.layers, blocks):
            for proj, w, b in zip((layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj),
                                  block.attn.in_proj_weight.chunk(3), block.attn.in_proj_bias.chunk(3)):
                proj.weight.copy_(w)
                proj.bias.copy_(b)
            pairs = [(layer.self_attn.out_proj, block.attn.out_proj), (layer.layer_norm1, block.ln_1),
                     (layer.layer_norm2, block.ln_2), (layer.mlp.fc1, block.mlp.c_fc), (layer.mlp.fc2, block.mlp.c_proj)]
            for ours, theirs in pairs:
                ours.weight.copy_(theirs.weight)
                ours.bias.copy_(theirs.bias)
        tm.final_layer_norm.weight.copy_(clip.ln_final.weight)
        tm.final_layer_norm.bias.copy_(clip.ln_final.bias)
    return model
