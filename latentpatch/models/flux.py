"""A stock diffusers FluxTransformer2DModel (FLUX.1 dev / schnell) as a Patch Diffusion network: velocity out.

`net(x[B, C+2, h, w], timestep[B], cond) -> v[B, C, h, w]` like every network here; the 2 coordinate channels
never reach the weights. The latents are packed 2x2 into tokens as FluxPipeline._pack_latents does, and a
crop's tokens get the rotary ids the full image gives them: FluxPipeline._prepare_latent_image_ids of the full
token grid, at the crop's rows and columns (latentpatch.models.token_grid). The text ids are zeros, as the
pipeline builds them. At full size this is the stock transformer's output for the pipeline's inputs; the
weights stay stock, so a fine-tune exports to FluxPipeline.

The stock forward takes one set of ids for a whole batch, so a batch of crops at different offsets is run as
one call per distinct offset (all of a full-size batch is one call).

`timestep` is t * 1000, the scheduler's timestep; like FluxPipeline the transformer is given timestep / 1000
(it multiplies by 1000 inside). Text: cond.text_tokens [B, L, D] (T5), cond.text_pooled [B, P] (CLIP pooled).
FLUX.1-dev's distilled guidance input (`guidance_embeds`) gets `guidance_scale` for every sample, as diffusers'
FLUX training examples give it args.guidance_scale (default 3.5); a call may pass its own `guidance`
(sampling: FluxPipeline's guidance_scale). Without guidance_embeds (schnell) there is no such input.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from latentpatch.conditioning import Conditioning
from latentpatch.errors import UserError
from latentpatch.models.token_grid import TokenGrid, check_stock_inputs, token_grid

FLUX_PACKING = 2  # FluxPipeline packs 2x2 latent pixels into one token
TRAINING_GUIDANCE = 3.5  # diffusers' train_dreambooth(_lora)_flux.py --guidance_scale default


def crop_image_ids(grid: TokenGrid, index: int, gh: int, gw: int, device: torch.device) -> Tensor:
    """[gh*gw, 3] float32: the full image's latent image ids (FluxPipeline._prepare_latent_image_ids) at the
    gh x gw tokens of sample `index`'s crop."""
    from diffusers import FluxPipeline

    full_h, full_w = int(grid.full_h[index]), int(grid.full_w[index])
    top, left = int(grid.top[index]), int(grid.left[index])
    ids = FluxPipeline._prepare_latent_image_ids(1, full_h, full_w, device, torch.float32)
    return ids.reshape(full_h, full_w, 3)[top:top + gh, left:left + gw].reshape(gh * gw, 3)


class FluxNetwork(nn.Module):
    """FluxPipeline's packing and ids around the stock FluxTransformer2DModel."""

    stock_weights = True  # nothing widened or added: a LoRA fine-tune trains its adapters alone

    def __init__(self, transformer: nn.Module, guidance_scale: float = TRAINING_GUIDANCE) -> None:
        super().__init__()
        if transformer.config.patch_size != 1:
            raise UserError(f"a FluxTransformer2DModel with patch_size {transformer.config.patch_size} is not FLUX.1 "
                            "(which packs 2x2 latents into tokens of patch size 1)")
        self.transformer = transformer
        self.patch_size = self.size_multiple = FLUX_PACKING
        self.latent_channels = int(transformer.config.in_channels) // FLUX_PACKING**2
        self.guidance_scale = float(guidance_scale)

    @classmethod
    def from_config(cls, config: dict[str, Any], guidance_scale: float = TRAINING_GUIDANCE) -> FluxNetwork:
        """A stock FluxTransformer2DModel built from its diffusers config (the weights come from a checkpoint)."""
        from diffusers import FluxTransformer2DModel

        return cls(FluxTransformer2DModel.from_config(config), guidance_scale)

    @property
    def embeds_guidance(self) -> bool:
        """FLUX.1-dev: guidance is a distilled input of the network (guidance_scale), not two calls per step."""
        return bool(self.transformer.config.guidance_embeds)

    def _guidance(self, batch: int, guidance: Tensor | float | None, device: torch.device) -> Tensor | None:
        if not self.transformer.config.guidance_embeds:
            return None
        value = self.guidance_scale if guidance is None else guidance
        return torch.as_tensor(value, dtype=torch.float32, device=device).reshape(-1).expand(batch)

    def forward(self, x: Tensor, timestep: Tensor, cond: Conditioning | None = None,
                guidance: Tensor | float | None = None) -> Tensor:
        from diffusers import FluxPipeline

        c, p = self.latent_channels, FLUX_PACKING
        h, w = check_stock_inputs(x, cond, c, p, network="FLUX transformer", short="FLUX",
                                  multiple_is="FLUX's 2x2 packing",
                                  text="the prompt's T5 tokens and CLIP pooled embedding")
        b = x.shape[0]
        grid = token_grid(x[:, c:], p)
        packed = FluxPipeline._pack_latents(x[:, :c], b, c, h, w)
        inputs = dict(hidden_states=packed, encoder_hidden_states=cond.text_tokens.to(packed.dtype),
                      pooled_projections=cond.text_pooled.to(packed.dtype), timestep=timestep / 1000,
                      guidance=self._guidance(b, guidance, x.device))
        txt_ids = torch.zeros(cond.text_tokens.shape[1], 3, device=x.device)
        offsets, group = torch.stack([grid.top, grid.left], 1).unique(dim=0, return_inverse=True)
        parts, order = [], []
        for k in range(len(offsets)):  # the stock forward takes one set of ids per call
            rows = (group == k).nonzero().flatten()
            first = int(rows[0])
            batch = {name: None if v is None else v[rows] for name, v in inputs.items()}
            ids = crop_image_ids(grid, first, h // p, w // p, x.device)
            parts.append(self.transformer(**batch, img_ids=ids, txt_ids=txt_ids, return_dict=False)[0])
            order.append(rows)
        out = parts[0] if len(parts) == 1 else torch.cat(parts)[torch.cat(order).argsort()]
        return FluxPipeline._unpack_latents(out, h, w, 1)
