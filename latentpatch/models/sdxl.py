"""A stock diffusers SDXL UNet (UNet2DConditionModel with `addition_embed_type="text_time"`) as a Patch Diffusion
network: `net(x[B, C+2, h, w], timestep[B], cond) -> [B, C, h, w]`, the base's own prediction (eps or v).

SDXL was pretrained on random crops, told through its micro-conditioning (Podell et al. 2023, Sec. 2.2): the
time ids (original_size, crops_coords_top_left, target_size) in pixels, embedded beside the pooled text. A patch
cut at latent offset (y0, x0) of an h x w crop of an H x W latent is such a crop, so the 2 coordinate channels
never reach the weights: the crop's place is read back from them (per-axis coordinates, models/token_grid.py with
a "token" of one latent pixel) and given as

    time_ids = (H, W, y0, x0, h, w) * vae_scale_factor        (StableDiffusionXLPipeline._get_add_time_ids' order)

per sample. At full size that is the pipeline's default (original_size = target_size = (height, width), crop
(0, 0)); the weights stay stock and export to StableDiffusionXLPipeline. Text: cond.text_tokens [B, 77, D] (both
CLIP towers' penultimate states concatenated), cond.text_pooled [B, P] (the second tower's projection), as the
pipeline's encode_prompt builds them (latentpatch.text.flow_encoder).

Coordinate channels on top of the time ids (conv_in widened by two zero-initialised inputs, config in_channels
C+2, as SD 1.x/2.x UNets are) were measured against the time ids alone (benchmarks/finetune/sdxl_channels.py,
docs/benchmarks.md "SDXL bases": 0.025% lower held-out loss, a twentieth of the seeds' spread), not worth a UNet
the stock pipeline cannot load; so a fine-tune never widens an SDXL UNet, but a run whose config is widened (the
measurement's "channels" arm) loads, trains and samples here. Its export is refused.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from latentpatch.conditioning import Conditioning
from latentpatch.errors import UserError
from latentpatch.models.model_config import downsampling
from latentpatch.models.token_grid import check_stock_inputs, token_grid
from latentpatch.models.widen import COORD_CHANNELS, CoordinateConv2d

TIME_IDS = 6  # original_size (2), crops_coords_top_left (2), target_size (2)


def is_sdxl_unet(config: dict[str, Any] | None) -> bool:
    """Whether a diffusers UNet config is SDXL's: a UNet2DConditionModel conditioned on text and time ids."""
    config = config or {}
    return config.get("_class_name") == "UNet2DConditionModel" and config.get("addition_embed_type") == "text_time"


def sdxl_pooled_width(config: dict[str, Any]) -> int:
    """The pooled text width the UNet's added embedding takes beside its 6 time ids."""
    return int(config["projection_class_embeddings_input_dim"]) - TIME_IDS * int(config["addition_time_embed_dim"])


def coordinate_inputs(config: dict[str, Any]) -> int:
    """How many coordinate channels the SDXL UNet of `config` reads through its conv_in: 0 (stock) or COORD_CHANNELS
    (widened: in_channels = out_channels + 2, a run's config only; check_sdxl_unet refuses such a base)."""
    latent = int(config.get("out_channels") or config["in_channels"])
    return COORD_CHANNELS if int(config["in_channels"]) == latent + COORD_CHANNELS else 0


def check_sdxl_unet(config: dict[str, Any], widened_ok: bool = False) -> None:
    """UserError for an SDXL-family UNet this wrapper cannot drive, each in one line (`widened_ok`: a run's config,
    whose conv_in may read the coordinate channels)."""
    if config.get("time_cond_proj_dim"):
        raise UserError("this SDXL UNet takes a guidance embedding (time_cond_proj_dim: an LCM-distilled model), which "
                        "latentpatch does not give it; fine-tune the undistilled base")
    latent = int(config.get("out_channels") or config["in_channels"])
    if int(config["in_channels"]) != latent + (coordinate_inputs(config) if widened_ok else 0):
        raise UserError(f"this SDXL UNet takes {config['in_channels']} input channels for {latent}-channel latents "
                        "(an inpainting or instruct model: extra image inputs latentpatch does not give)")
    if sdxl_pooled_width(config) <= 0:
        raise UserError("this SDXL UNet's added embedding has no room for 6 time ids beside the pooled text (the "
                        "refiner conditions on an aesthetic score instead); fine-tune the SDXL base or its fine-tunes")


class SDXLNetwork(nn.Module):
    """UNet2DConditionModel.forward with SDXL's added conditioning computed from the crop's coordinates."""

    def __init__(self, unet: nn.Module, vae_scale_factor: int, attention_backend: str = "sdpa") -> None:
        super().__init__()
        from diffusers.models.attention_processor import Attention

        from latentpatch.models.unet import PROCESSORS

        check_sdxl_unet(dict(unet.config), widened_ok=True)
        if vae_scale_factor < 1:
            raise UserError("an SDXL UNet needs model.pretrained.vae_scale_factor (pixels per latent pixel of its VAE): "
                            "its micro-conditioning is in pixels")
        self.unet = unet
        self.latent_channels = int(unet.config.out_channels)
        self.coordinate_inputs = coordinate_inputs(dict(unet.config))  # 0: stock (what a fine-tune makes)
        if self.coordinate_inputs and not isinstance(unet.conv_in, CoordinateConv2d):
            unet.conv_in = CoordinateConv2d.from_plain(unet.conv_in)  # bit-exact while the new weights are zero
        self.stock_weights = not self.coordinate_inputs  # stock: a LoRA fine-tune trains its adapters alone
        self.lora_trainable = ("unet.conv_in.",) if self.coordinate_inputs else ()
        self.vae_scale_factor = int(vae_scale_factor)
        self.size_multiple = downsampling(unet.config)
        processor = PROCESSORS[attention_backend]()
        for module in unet.modules():
            if isinstance(module, Attention):
                module.set_processor(processor)

    @classmethod
    def from_config(cls, config: dict[str, Any], vae_scale_factor: int, attention_backend: str = "sdpa"
                    ) -> SDXLNetwork:
        """The UNet built from its diffusers config (the weights come from a checkpoint)."""
        from diffusers import UNet2DConditionModel

        return cls(UNet2DConditionModel.from_config(config), vae_scale_factor, attention_backend)

    def time_ids(self, coords: Tensor, dtype: torch.dtype) -> Tensor:
        """[B, 6] (H, W, y0, x0, h, w) in pixels of each crop with per-axis coordinates `coords` [B, 2, h, w]."""
        grid = token_grid(coords, 1)  # a latent pixel per "token": offsets and full sides in latent pixels
        h, w = coords.shape[-2:]
        size = torch.tensor([h, w], device=coords.device).expand(len(coords), 2)
        ids = torch.cat([torch.stack([grid.full_h, grid.full_w, grid.top, grid.left], 1), size], 1)
        return (ids * self.vae_scale_factor).to(dtype)

    def forward(self, x: Tensor, timestep: Tensor, cond: Conditioning | None = None) -> Tensor:
        c, m = self.latent_channels, self.size_multiple
        check_stock_inputs(x, cond, c, m, network="SDXL UNet", short="SDXL", multiple_is=f"{m}, the SDXL UNet's "
                           "total downsampling; use crop sizes that are multiples of it")
        dtype = self.unet.dtype
        tokens = cond.text_tokens.to(dtype)
        added = {"text_embeds": cond.text_pooled.to(dtype), "time_ids": self.time_ids(x[:, c:], tokens.dtype)}
        sample = x if self.coordinate_inputs else x[:, :c]  # a widened conv_in reads the coordinates too
        return self.unet(sample, timestep, tokens, added_cond_kwargs=added, return_dict=False)[0]


def sdxl_network(cfg: Any, latent_channels: int, attention_backend: str) -> SDXLNetwork:
    """The SDXLNetwork of a run's model config (model.arch=pretrained, an SDXL UNet); its text widths must be the
    encoder's and its latent channels the store's."""
    config = cfg.pretrained.config
    if cfg.num_classes:
        raise UserError("the SDXL UNet is text-conditioned, not class-conditional; set model.num_classes=0")
    net = SDXLNetwork.from_config(config, cfg.pretrained.vae_scale_factor, attention_backend)
    if net.latent_channels != latent_channels:
        raise UserError(f"the SDXL UNet takes {net.latent_channels}-channel latents but the store holds "
                        f"{latent_channels}-channel ones; encode with the base pipeline's vae/")
    want = (int(config["cross_attention_dim"]), sdxl_pooled_width(config))
    if (cfg.text_dim, cfg.pooled_text_dim) != want:
        raise UserError(f"the text encoder gives tokens {cfg.text_dim} wide and a pooled embedding "
                        f"{cfg.pooled_text_dim} wide, but the SDXL UNet takes {want[0]} and {want[1]}; encode with "
                        "the pipeline's own text encoders")
    if cfg.grad_checkpointing:
        net.unet.enable_gradient_checkpointing()
    return net
