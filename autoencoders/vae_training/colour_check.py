"""Does an autoencoder give back the colour it is given? Flat fields over the hue circle, at several saturations
and values, encoded and decoded; errors of each field's mean colour per channel and as CIE76 ΔE in CIELAB."""

from __future__ import annotations

import colorsys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import kornia
import torch
from torch import Tensor

HUES = 12
SATURATIONS = (0.25, 0.5, 0.75, 1.0)
VALUES = (0.5, 0.75, 1.0)
FIELD_SIDE = 64
QUICK_SET = {"hues": 12, "saturations": (0.5, 1.0), "values": (0.5, 1.0)}  # the check train-vae runs while training


def flat_colours(hues: int = HUES, saturations: tuple[float, ...] = SATURATIONS,
                 values: tuple[float, ...] = VALUES) -> Tensor:
    """[N, 3] colours in [-1, 1]: every hue i / hues of the circle at each saturation and value, then the greys."""
    hsv = [(h / hues, s, v) for v in values for s in saturations for h in range(hues)]
    hsv += [(0.0, 0.0, v) for v in (0.0, *values)]
    return torch.tensor([colorsys.hsv_to_rgb(*c) for c in hsv]) * 2 - 1


def describe(hues: int = HUES, saturations: tuple[float, ...] = SATURATIONS,
             values: tuple[float, ...] = VALUES) -> str:
    """The field set of flat_colours(...) in words, for model cards."""
    sats, vals = (", ".join(f"{x:g}" for x in v) for v in (saturations, values))
    return f"{hues} hues x saturations {sats} x values {vals}, and {len(values) + 1} greys"


@dataclass
class ColourCheck:
    fields: int
    side: int
    worst: list[float]  # per channel (R, G, B): largest |mean decoded colour - colour| over the fields
    mean: list[float]  # per channel: mean of the same over the fields
    delta_e_mean: float  # CIE76 ΔE (Euclidean in CIELAB, D65) of the mean decoded colour
    delta_e_max: float
    worst_field: list[list[float]]  # [colour, decoded mean colour] of the field with the largest channel error

    @property
    def worst_channel_error(self) -> float:
        return max(self.worst)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "worst_channel_error": self.worst_channel_error}


def lab(colours: Tensor) -> Tensor:
    """[N, 3] colours in [-1, 1] -> CIELAB (kornia: sRGB in [0, 1], D65 white)."""
    return kornia.color.rgb_to_lab(((colours + 1) / 2).clamp(0, 1)[:, :, None, None])[:, :, 0, 0]


def colour_check(reconstruct: Callable[[Tensor], Tensor], colours: Tensor | None = None, side: int = FIELD_SIDE,
                 batch: int = 32) -> ColourCheck:
    """`reconstruct` maps images [B, 3, H, W] in [-1, 1] to their decoded images; each field is scored by the mean
    colour it comes back with (the eye judges a flat area by its average, and so do the numbers here)."""
    colours = flat_colours() if colours is None else colours
    got = []
    for part in colours.split(batch):
        fields = part[:, :, None, None].expand(-1, -1, side, side).contiguous()
        got.append(reconstruct(fields).float().cpu().clamp(-1, 1).mean((2, 3)))
    got = torch.cat(got)
    err = (got - colours).abs()
    delta_e = (lab(got) - lab(colours)).norm(dim=1)
    i = int(err.amax(1).argmax())
    return ColourCheck(
        fields=len(colours), side=side, worst=err.amax(0).tolist(), mean=err.mean(0).tolist(),
        delta_e_mean=float(delta_e.mean()), delta_e_max=float(delta_e.max()),
        worst_field=[colours[i].tolist(), got[i].tolist()],
    )
