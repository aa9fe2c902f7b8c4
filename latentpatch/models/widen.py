"""Pretrained diffusers UNets as Patch Diffusion denoisers: the input layer gains zero-initialised coordinate
channels. (A pretrained DiT stays stock, its position table computed from the coordinates: pretrained_dit.py;
runs fine-tuned before that hold its patch embedding widened by CoordinateConv2d too.)

Widening conv_in from C to C+2 input channels with zero weights on the two new ones leaves the network's
function unchanged (Patch Diffusion, Wang et al. 2023, Sec. 3.2 adds coordinates as input channels), so
fine-tuning starts exactly from the pretrained model and learns to use the coordinates.
"""

from __future__ import annotations

import json
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from latentpatch.errors import UserError

COORD_CHANNELS = 2
SUPPORTED_CLASSES = ("UNet2DModel", "UNet2DConditionModel")


class CoordinateConv2d(nn.Conv2d):
    """A conv over [x, coords] computed as conv(x) + conv(coords) with the weight split by input channel.

    The parameters are a plain Conv2d's (same state-dict keys and shapes), but while the coordinate weights
    are zero the output is bit-for-bit the original layer's on x: the split keeps the original summation.
    """

    def __init__(self, *args: Any, coord_channels: int = COORD_CHANNELS, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.coord_channels = coord_channels

    @classmethod
    def widen(cls, conv: nn.Conv2d, coord_channels: int = COORD_CHANNELS) -> CoordinateConv2d:
        """A copy of `conv` with `coord_channels` extra input channels whose weights are zero."""
        wide = cls(
            conv.in_channels + coord_channels, conv.out_channels, conv.kernel_size, stride=conv.stride,
            padding=conv.padding, dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
            padding_mode=conv.padding_mode, coord_channels=coord_channels,
            device=conv.weight.device, dtype=conv.weight.dtype,
        )
        with torch.no_grad():
            wide.weight.zero_()
            wide.weight[:, : conv.in_channels].copy_(conv.weight)
            if conv.bias is not None:
                wide.bias.copy_(conv.bias)
        return wide

    @classmethod
    def from_plain(cls, conv: nn.Conv2d, coord_channels: int = COORD_CHANNELS) -> CoordinateConv2d:
        """The same layer (its weights shared), computing in the split form."""
        split = cls(
            conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
            dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None, padding_mode=conv.padding_mode,
            coord_channels=coord_channels, device="meta",
        )
        split.weight, split.bias = conv.weight, conv.bias
        return split

    def forward(self, x: Tensor) -> Tensor:
        if self.padding_mode != "zeros" or self.groups != 1:
            return super().forward(x)
        c = self.in_channels - self.coord_channels
        main = F.conv2d(x[:, :c], self.weight[:, :c].contiguous(), self.bias, self.stride, self.padding, self.dilation)
        coords = F.conv2d(x[:, c:], self.weight[:, c:].contiguous(), None, self.stride, self.padding, self.dilation)
        return main + coords


def check_unet_config(config: dict[str, Any], latent_channels: int) -> None:
    """UserError for a pretrained UNet this toolkit cannot drive (what extra inputs it wants, or channels)."""
    unsupported = {k: config.get(k) for k in ("class_embed_type", "num_class_embeds", "addition_embed_type",
                                              "encoder_hid_dim_type") if config.get(k)}
    if unsupported:
        raise UserError(f"the pretrained UNet needs inputs latentpatch does not provide ({unsupported}); "
                        "use an unconditional or text-only (cross-attention) UNet")
    out_channels = config.get("out_channels") or config.get("in_channels")
    if out_channels != latent_channels:
        raise UserError(f"the pretrained UNet predicts {out_channels} channels but the latents have {latent_channels}; "
                        "encode with the autoencoder the UNet was trained with")


def widen_unet(unet: nn.Module, latent_channels: int) -> nn.Module:
    """The UNet with conv_in widened by the coordinate channels (zero weights), its config updated to match."""
    conv = unet.conv_in
    if conv.in_channels != latent_channels:
        raise UserError(f"the pretrained UNet takes {conv.in_channels} input channels but the latents have "
                        f"{latent_channels}; encode with the autoencoder the UNet was trained with")
    check_unet_config(dict(unet.config), latent_channels)
    unet.conv_in = CoordinateConv2d.widen(conv)
    unet.register_to_config(in_channels=latent_channels + COORD_CHANNELS)
    return unet


def unet_from_config(config: dict[str, Any]) -> nn.Module:
    """Rebuild a widened UNet from its saved config (weights come from a checkpoint)."""
    import diffusers

    name = config.get("_class_name")
    if name not in SUPPORTED_CLASSES:
        raise UserError(f"model.pretrained.class_name is {name!r}; expected one of {', '.join(SUPPORTED_CLASSES)}")
    unet = getattr(diffusers, name).from_config(config)
    unet.conv_in = CoordinateConv2d.from_plain(unet.conv_in)
    return unet


def json_config(unet: nn.Module) -> dict[str, Any]:
    """The UNet's config as plain JSON/YAML values (tuples -> lists), with its class name."""
    cfg = json.loads(json.dumps(dict(unet.config), default=list))
    cfg["_class_name"] = type(unet).__name__
    return {k: v for k, v in cfg.items() if not k.startswith("_") or k == "_class_name"}
