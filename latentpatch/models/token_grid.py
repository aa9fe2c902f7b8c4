"""Where a crop's tokens sit on the full image's token grid, read from its per-axis coordinate channels.

A pretrained transformer with its own position encoding (SD3's cropped sin-cos table, FLUX's rotary ids) is
told a crop's place in that encoding's language, never through extra input channels: each latent pixel's
index k on a side of R pixels follows from c = 2k/(R-1) - 1 (latentpatch.patches, coordinate_scale
"per-axis"), and with crops aligned to the token grid (offsets multiples of the patch size p) token j of the
crop is token k_0/p + j of the full image's R/p.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from latentpatch.conditioning import Conditioning
from latentpatch.errors import UserError
from latentpatch.models.widen import COORD_CHANNELS


@dataclass(frozen=True)
class TokenGrid:
    """Per sample: the crop's first token row and column on the full token grid, and that grid's sides."""

    top: Tensor  # [B] long
    left: Tensor  # [B] long
    full_h: Tensor  # [B] long: tokens per column of the full image
    full_w: Tensor  # [B] long: tokens per row

    def rows(self, n: int) -> Tensor:
        """[B, n] the full-grid row of each of the crop's n token rows."""
        return self.top[:, None] + torch.arange(n, device=self.top.device)

    def cols(self, n: int) -> Tensor:
        return self.left[:, None] + torch.arange(n, device=self.left.device)


def _axis(c: Tensor, patch: int, name: str) -> tuple[Tensor, Tensor]:
    """One axis of the coordinates [B, n] -> (first pixel's index k_0 [B], full side R [B]), both long."""
    n = c.shape[1]
    if n < 2:
        raise UserError(f"a crop needs at least 2 latent pixels per side to place it on the full grid, got {n}")
    c = c.to(torch.float64)
    full_minus_1 = torch.round(2 * (n - 1) / (c[:, -1] - c[:, 0]))  # R - 1, from the span of n - 1 pixels
    first = torch.round((c[:, 0] + 1) * full_minus_1 / 2)
    first, full = first.long(), full_minus_1.long() + 1
    if bool(((first % patch != 0) | (full % patch != 0)).any()):
        raise UserError(f"a crop's {name} offset or the image's {name} side is not a multiple of the patch size "
                        f"{patch}: fine-tuning this base needs crops on its token grid (patches.aligned=true) and "
                        f"latent sides that are multiples of {patch}")
    return first, full


def token_grid(coords: Tensor, patch: int) -> TokenGrid:
    """The token grid of crops with per-axis coordinates `coords` [B, 2, h, w] (channel 0 x, 1 y)."""
    left, full_w = _axis(coords[:, 0, 0, :], patch, "horizontal")
    top, full_h = _axis(coords[:, 1, :, 0], patch, "vertical")
    return TokenGrid(top // patch, left // patch, full_h // patch, full_w // patch)


def check_stock_inputs(x: Tensor, cond: Conditioning | None, channels: int, multiple: int, *, network: str,
                       short: str, multiple_is: str,
                       text: str = "the prompt's token and pooled embeddings") -> tuple[int, int]:
    """The (h, w) of the input of a stock text-conditioned network that reads its place from coordinates (SD3,
    FLUX, SDXL): `channels` latent channels and the coordinate channels, text tokens and pooled embedding, sides
    divisible by `multiple`; else a UserError in one line (`network`, `short`, `multiple_is`: its words)."""
    if x.shape[1] != channels + COORD_CHANNELS:
        raise UserError(f"the {network} takes {channels} latent channels (+{COORD_CHANNELS} coordinates), got "
                        f"{x.shape[1]} in all")
    if cond is None or cond.text_tokens is None or cond.text_pooled is None:
        raise UserError(f"{short} is text-conditioned: it needs {text} (the empty caption's for an unconditional "
                        "call)")
    h, w = x.shape[-2:]
    if h % multiple or w % multiple:
        raise UserError(f"latent size {h}x{w} is not divisible by {multiple_is}")
    return h, w
