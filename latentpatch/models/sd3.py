"""A stock diffusers SD3Transformer2DModel (SD3, SD3.5) as a Patch Diffusion network: velocity out.

`net(x[B, C+2, h, w], timestep[B], cond) -> v[B, C, h, w]` like every network here, but the 2 coordinate
channels never reach the weights: they only say where the crop sits (latentpatch.models.token_grid), and the
crop gets the window of SD3's position table that the full image would give those tokens. SD3 takes the
table's centred window for an image (PatchEmbed.cropped_pos_embed, `pos_embed_max_size`); a crop takes the
full image's centred window shifted by its offset in tokens. At full size that is exactly what the stock
transformer computes, and the weights stay stock, so a fine-tune exports to StableDiffusion3Pipeline.

`timestep` is the scheduler's timestep t * num_train_timesteps, as StableDiffusion3Pipeline passes it; the text
comes as the pipeline's encode_prompt gives it: cond.text_tokens [B, 77 + L, D] (CLIP-L and CLIP-G padded to
T5's width, then T5), cond.text_pooled [B, P] (the two CLIP projections). SD3.5's options (qk norm, dual
attention blocks) are diffusers config and need nothing here.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from latentpatch.conditioning import Conditioning
from latentpatch.errors import UserError
from latentpatch.models.token_grid import TokenGrid, check_stock_inputs, token_grid


def crop_pos_embed(patch_embed: nn.Module, grid: TokenGrid, gh: int, gw: int) -> Tensor:
    """[B, gh*gw, D] float32: SD3's position embedding of each crop's gh x gw tokens, the full image's centred
    window of the max-size table (PatchEmbed.cropped_pos_embed) shifted by the crop's offset."""
    size = patch_embed.pos_embed_max_size
    if bool(((grid.full_h > size) | (grid.full_w > size)).any()):
        raise UserError(f"an image of {int(grid.full_h.max())}x{int(grid.full_w.max())} tokens is larger than the "
                        f"SD3 transformer's position table ({size}x{size} tokens, pos_embed_max_size)")
    table = patch_embed.pos_embed.reshape(size, size, -1)
    rows = ((size - grid.full_h) // 2)[:, None] + grid.rows(gh)  # [B, gh]
    cols = ((size - grid.full_w) // 2)[:, None] + grid.cols(gw)  # [B, gw]
    return table[rows[:, :, None], cols[:, None, :]].reshape(len(rows), gh * gw, -1)


class SD3Network(nn.Module):
    """SD3Transformer2DModel.forward with the crop's window of the position table; the transformer is stock."""

    stock_weights = True  # nothing widened or added: a LoRA fine-tune trains its adapters alone

    def __init__(self, transformer: nn.Module) -> None:
        super().__init__()
        if getattr(transformer.pos_embed, "pos_embed_max_size", None) is None:
            raise UserError("this SD3Transformer2DModel has no pos_embed_max_size, so its position table cannot be "
                            "windowed per crop")
        self.transformer = transformer
        self.patch_size = self.size_multiple = int(transformer.config.patch_size)
        self.latent_channels = int(transformer.config.in_channels)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> SD3Network:
        """A stock SD3Transformer2DModel built from its diffusers config (the weights come from a checkpoint)."""
        from diffusers import SD3Transformer2DModel

        return cls(SD3Transformer2DModel.from_config(config))

    def forward(self, x: Tensor, timestep: Tensor, cond: Conditioning | None = None) -> Tensor:
        tr, p, c = self.transformer, self.patch_size, self.latent_channels
        h, w = check_stock_inputs(x, cond, c, p, network="SD3 transformer", short="SD3",
                                  multiple_is=f"the SD3 patch size {p}")
        latent, coords = x[:, :c], x[:, c:]
        embed = tr.pos_embed
        tokens = embed.proj(latent).flatten(2).transpose(1, 2)
        if embed.layer_norm:
            tokens = embed.norm(tokens)
        pos = crop_pos_embed(embed, token_grid(coords, p), h // p, w // p)
        hidden = (tokens + pos).to(tokens.dtype).contiguous()  # PatchEmbed.forward's sum and cast
        temb = tr.time_text_embed(timestep, cond.text_pooled.to(latent.dtype))
        context = tr.context_embedder(cond.text_tokens.to(latent.dtype))
        for block in tr.transformer_blocks:
            if torch.is_grad_enabled() and tr.gradient_checkpointing:
                context, hidden = tr._gradient_checkpointing_func(block, hidden, context, temb, None)
            else:
                context, hidden = block(hidden_states=hidden, encoder_hidden_states=context, temb=temb,
                                        joint_attention_kwargs=None)
        hidden = tr.proj_out(tr.norm_out(hidden, temb))
        out = hidden.reshape(hidden.shape[0], h // p, w // p, p, p, tr.out_channels)
        return torch.einsum("nhwpqc->nchpwq", out).reshape(hidden.shape[0], tr.out_channels, h, w)
