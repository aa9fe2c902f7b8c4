"""Embeddings for the DiT: noise level, class label, and token position from the coordinate channels."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Coordinates in [-1, 1] are scaled so the full grid spans this many unit steps: adjacent tokens of a
# grid up to this many tokens per side are one radian apart at the highest frequency, and the lowest
# frequency (1/10000) never wraps, so every position up to this size gets its own embedding.
REFERENCE_TOKENS_PER_SIDE = 256


def sincos_embedding_1d(pos: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """DiT/MAE 1D sin-cos embedding of continuous positions: [...] -> [..., dim] (sin half, then cos)."""
    half = dim // 2
    omega = torch.exp(-math.log(max_period) * torch.arange(half, device=pos.device) / half)
    args = pos.float()[..., None] * omega
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


class CoordinatePositionEmbedding(nn.Module):
    """Token positions from the coordinate channels themselves, never from the crop's own token grid.

    Each token's (x, y) is the mean of the coordinate channels over its p x p patch, i.e. its absolute
    place on the full latent grid; half the width encodes x, half y. A crop therefore gets exactly the
    embedding the full grid has at the same place (Patch Diffusion, Wang et al. 2023, Sec. 3.2).
    """

    def __init__(self, hidden_size: int, patch_size: int) -> None:
        super().__init__()
        if hidden_size % 4:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by 4 for the 2D sin-cos embedding")
        self.hidden_size = hidden_size
        self.patch_size = patch_size

    def forward(self, coords: Tensor) -> Tensor:
        """coords [B, 2, h, w] (x then y, in [-1, 1]) -> [B, (h/p)*(w/p), hidden] float32."""
        centers = F.avg_pool2d(coords.float(), self.patch_size)           # [B, 2, h/p, w/p]
        pos = (centers + 1) * ((REFERENCE_TOKENS_PER_SIDE - 1) / 2)       # [0, ref-1]
        emb_x = sincos_embedding_1d(pos[:, 0], self.hidden_size // 2)
        emb_y = sincos_embedding_1d(pos[:, 1], self.hidden_size // 2)
        return torch.cat([emb_x, emb_y], dim=-1).flatten(1, 2)


class TimestepEmbedder(nn.Module):
    """EDM's c_noise = ln(sigma)/4 -> sinusoidal features -> MLP (DiT; GLIDE's frequencies)."""

    def __init__(self, hidden_size: int, frequency_size: int = 256) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, c_noise: Tensor) -> Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=c_noise.device) / half)
        args = c_noise.float()[:, None] * freqs[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> vector; row `num_classes` is the null label. The caller drops labels for guidance."""

    def __init__(self, num_classes: int, hidden_size: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding_table(labels)
