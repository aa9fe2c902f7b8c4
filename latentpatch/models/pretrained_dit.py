"""A pretrained diffusers DiTTransformer2DModel (class-conditional DiT-XL/2) as a Patch Diffusion denoiser.

`net(x[B, C+2, h, w], t[B], cond) -> [B, C, h, w]` like every denoiser here. The transformer stays stock (C
input channels, its patch embedding untouched): only DiT's fixed 2-D sin-cos position table is computed from
the coordinate channels, each token's place on the full latent grid read from them and embedded with
diffusers' own get_2d_sincos_pos_embed_from_grid, so at full size it equals the pretrained table bit for bit
and an aligned crop gets exactly its slice. The table carries everything the coordinates say; coordinate
channels added to the patch embedding on top of it measured no better (docs/benchmarks.md, "DiT bases"), so a
fine-tune keeps the weights stock-shaped and exports to the stock DiTPipeline. Runs fine-tuned before that
have a patch embedding widened by two zero-initialised coordinate inputs (config in_channels C+2); they still
load and sample. A learned-sigma DiT predicts 2C channels; the mean (first C) is used.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentpatch.conditioning import Conditioning
from latentpatch.errors import UserError
from latentpatch.models.model_config import ModelConfig
from latentpatch.models.routing import TokenRoute, route_in, route_out
from latentpatch.models.widen import COORD_CHANNELS, CoordinateConv2d

DIT_CLASSES = ("DiTTransformer2DModel",)


def coordinate_inputs(config: dict[str, Any], latent_channels: int) -> int:
    """How many coordinate channels the DiT of `config` reads through its patch embedding: 0 (stock, positions
    from the table alone) or COORD_CHANNELS (a run fine-tuned with widened inputs); UserError otherwise."""
    in_channels = config.get("in_channels")
    if in_channels == latent_channels:
        return 0
    if in_channels == latent_channels + COORD_CHANNELS:
        return COORD_CHANNELS
    raise UserError(f"model.pretrained.config takes {in_channels} input channels, but the latents have "
                    f"{latent_channels}; encode with the autoencoder the DiT was trained with")


def dit_from_config(config: dict[str, Any], latent_channels: int) -> nn.Module:
    """The DiT of a saved config (weights come from a checkpoint); a widened one computes its patch embedding
    in the split form (models/widen.py)."""
    from diffusers import DiTTransformer2DModel

    transformer = DiTTransformer2DModel.from_config(config)
    if coordinate_inputs(config, latent_channels):
        transformer.pos_embed.proj = CoordinateConv2d.from_plain(transformer.pos_embed.proj)
    return transformer


def _axis_positions(c: Tensor, patch: int, base_size: int, interpolation_scale: float) -> Tensor:
    """One axis of a crop's coordinates [B, n] -> the DiT's sin-cos positions of its n/p tokens [B, n/p] float32.

    The full grid's side R and each pixel's index k follow from c = 2k/(R-1) - 1 (latentpatch.patches), a
    token's index is k/p of its first pixel (an integer on aligned crops), and its position is diffusers'
    arange(G) / (G / base_size) / interpolation_scale with G = R // p tokens per side.
    """
    n = c.shape[1]
    if n < 2:
        raise UserError(f"a pretrained DiT needs crops of at least 2 latent pixels per side, got {n}")
    c = c.to(torch.float64)
    full_minus_1 = torch.round(2 * (n - 1) / (c[:, -1] - c[:, 0]))  # R - 1, [B]
    k = torch.round((c[:, ::patch] + 1) * full_minus_1[:, None] / 2)
    tokens_per_side = torch.div(full_minus_1 + 1, patch, rounding_mode="floor")
    ratio = (tokens_per_side / base_size).to(torch.float32)  # a float64 quotient to float32, as a Python scalar
    return (k / patch).to(torch.float32) / ratio[:, None] / interpolation_scale


def coordinate_pos_embed(coords: Tensor, embed_dim: int, patch: int, base_size: int,
                         interpolation_scale: float) -> Tensor:
    """DiT's position embedding of the tokens of coords [B, 2, h, w] (x then y) -> [B, (h/p)(w/p), D] float32."""
    from diffusers.models.embeddings import get_2d_sincos_pos_embed_from_grid

    pos_w = _axis_positions(coords[:, 0, 0, :], patch, base_size, interpolation_scale)  # [B, w/p]
    pos_h = _axis_positions(coords[:, 1, :, 0], patch, base_size, interpolation_scale)  # [B, h/p]
    b, gh, gw = pos_w.shape[0], pos_h.shape[1], pos_w.shape[1]
    # get_2d_sincos_pos_embed's grid: meshgrid(grid_w, grid_h, "xy"), so channel 0 holds w and 1 holds h
    grid = torch.stack([pos_w[:, None, :].expand(b, gh, gw), pos_h[:, :, None].expand(b, gh, gw)])
    return get_2d_sincos_pos_embed_from_grid(embed_dim, grid).float().reshape(b, gh * gw, embed_dim)


class PretrainedDiT(nn.Module):
    """diffusers' DiT forward with the positions from the coordinates and any h x w (multiples of p)."""

    def __init__(self, cfg: ModelConfig, latent_channels: int, attention_backend: str) -> None:
        super().__init__()
        from diffusers.models.attention_processor import Attention
        from diffusers.models.embeddings import LabelEmbedding

        from latentpatch.models.unet import PROCESSORS

        config = cfg.pretrained.config
        self.coordinate_inputs = coordinate_inputs(config, latent_channels)  # 0: stock; 2: widened (older runs)
        if cfg.text_dim or cfg.pooled_text_dim:
            raise UserError("a pretrained DiTTransformer2DModel is class-conditional and has no text input; "
                            "set text.model=none")
        self.transformer = dit_from_config(config, latent_channels)
        # LoRA trains the adapters and the layers a fine-tune widened (models/lora.py): here none, or the
        # patch embedding of a run fine-tuned with coordinate inputs
        self.lora_trainable = ("transformer.pos_embed.proj.",) if self.coordinate_inputs else ()
        self.stock_weights = not self.coordinate_inputs
        self.latent_channels, self.num_classes = latent_channels, int(config.get("num_embeds_ada_norm") or 0)
        self.patch_size = self.size_multiple = int(self.transformer.patch_size)
        if cfg.num_classes != self.num_classes:
            raise UserError(f"model.num_classes={cfg.num_classes} but the pretrained DiT has {self.num_classes} classes")
        for module in self.transformer.modules():
            if isinstance(module, LabelEmbedding):
                if module.embedding_table.num_embeddings != self.num_classes + 1:
                    raise UserError("the pretrained DiT has no null-class embedding (class_dropout_prob 0), which "
                                    "classifier-free guidance and label dropout need")
                module.dropout_prob = 0.0  # label dropout is the trainer's (train.label_dropout), not diffusers'
            if isinstance(module, Attention):
                module.set_processor(PROCESSORS[attention_backend]())
        if cfg.grad_checkpointing:
            self.transformer.enable_gradient_checkpointing()

    def forward(self, x: Tensor, c_noise: Tensor, cond: Conditioning | None = None,
                route: TokenRoute | None = None) -> Tensor:
        """`route`: the tokens that go through blocks route.start..route.end (a sampling cache's, as the DiT's)."""
        tr, p = self.transformer, self.patch_size
        h, w = x.shape[-2:]
        if h % p or w % p:
            raise UserError(f"latent size {h}x{w} is not divisible by the DiT patch size {p}; use crop sizes that "
                            "are multiples of it")
        embed = tr.pos_embed
        c = self.latent_channels + self.coordinate_inputs  # what the patch embedding reads
        tokens = embed.proj(x[:, :c]).flatten(2).transpose(1, 2)
        if embed.layer_norm:
            tokens = embed.norm(tokens)
        pos = coordinate_pos_embed(x[:, self.latent_channels:], tokens.shape[-1], p, embed.base_size,
                                   embed.interpolation_scale)
        tokens = (tokens + pos).to(tokens.dtype)
        labels = None if cond is None else cond.class_labels
        if labels is None:  # no label given: the null label, i.e. unconditional
            labels = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
        for i, block in enumerate(tr.transformer_blocks):
            if route is not None and i == route.start:
                before, tokens = tokens, route_in(tokens, route)
            if torch.is_grad_enabled() and tr.gradient_checkpointing:
                tokens = tr._gradient_checkpointing_func(block, tokens, None, None, None, c_noise, None, labels)
            else:
                tokens = block(tokens, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                               timestep=c_noise, cross_attention_kwargs=None, class_labels=labels)
            if route is not None and i == route.end:
                tokens = route_out(tokens, before, route)
        conditioning = tr.transformer_blocks[0].norm1.emb(c_noise, labels, hidden_dtype=tokens.dtype)
        shift, scale = tr.proj_out_1(F.silu(conditioning)).chunk(2, dim=1)
        tokens = tr.proj_out_2(tr.norm_out(tokens) * (1 + scale[:, None]) + shift[:, None])
        c_out = tr.out_channels
        out = tokens.reshape(-1, h // p, w // p, p, p, c_out)
        out = torch.einsum("nhwpqc->nchpwq", out).reshape(-1, c_out, h, w)
        return out[:, : self.latent_channels]  # learned sigma: the variance channels are not used
