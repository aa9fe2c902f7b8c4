"""latentpatch's DiT as a diffusers model (ModelMixin + ConfigMixin), shipped inside an exported pipeline folder.

This file is copied into `transformer/` of a `latentpatch export` folder and loaded from there by
`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)`, so it imports torch and diffusers only,
never latentpatch. It computes what latentpatch/models/dit.py computes (Peebles & Xie 2023, with token
positions from the two coordinate channels, PixArt-alpha cross-attention on text tokens and EDM's
c_noise as the timestep), with the same parameter names; tests/test_export_models.py holds the two to
bitwise equality.

    transformer(hidden_states[B, C+2, h, w], timestep=c_noise[B], class_labels=None,
                encoder_hidden_states=None, encoder_attention_mask=None, pooled_projections=None).sample
        -> [B, C, h, w]
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

# Coordinates in [-1, 1] span this many unit steps before the sin-cos embedding (latentpatch/models/embeddings.py).
REFERENCE_TOKENS_PER_SIDE = 256


def sincos_embedding_1d(pos: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """DiT/MAE 1D sin-cos embedding of continuous positions: [...] -> [..., dim] (sin half, then cos)."""
    half = dim // 2
    omega = torch.exp(-math.log(max_period) * torch.arange(half, device=pos.device) / half)
    args = pos.float()[..., None] * omega
    return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class CoordinatePositionEmbedding(nn.Module):
    """Each token's position is the mean of the coordinate channels over its p x p patch (its place on the
    full grid); half the width encodes x, half y."""

    def __init__(self, hidden_size: int, patch_size: int) -> None:
        super().__init__()
        self.hidden_size, self.patch_size = hidden_size, patch_size

    def forward(self, coords: Tensor) -> Tensor:
        centers = F.avg_pool2d(coords.float(), self.patch_size)
        pos = (centers + 1) * ((REFERENCE_TOKENS_PER_SIDE - 1) / 2)
        emb_x = sincos_embedding_1d(pos[:, 0], self.hidden_size // 2)
        emb_y = sincos_embedding_1d(pos[:, 1], self.hidden_size // 2)
        return torch.cat([emb_x, emb_y], dim=-1).flatten(1, 2)


class TimestepEmbedder(nn.Module):
    """EDM's c_noise = ln(sigma)/4 -> sinusoidal features (cos, then sin) -> MLP."""

    def __init__(self, hidden_size: int, frequency_size: int = 256) -> None:
        super().__init__()
        self.frequency_size = frequency_size
        self.mlp = nn.Sequential(nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size))

    def forward(self, c_noise: Tensor) -> Tensor:
        half = self.frequency_size // 2
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, device=c_noise.device) / half)
        args = c_noise.float()[:, None] * freqs[None]
        features = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(features.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> vector; row `num_classes` is the null label (classifier-free guidance)."""

    def __init__(self, num_classes: int, hidden_size: int) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding_table(labels)


class SelfAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class CrossAttention(nn.Module):
    """Queries from the (pre-LN) image tokens, keys/values from text tokens; padding masked out."""

    def __init__(self, hidden_size: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.q = nn.Linear(hidden_size, hidden_size)
        self.kv = nn.Linear(hidden_size, 2 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor, text: Tensor, text_mask: Tensor | None) -> Tensor:
        b, n, d = x.shape
        heads, dh = self.num_heads, d // self.num_heads
        q = self.q(self.norm(x)).view(b, n, heads, dh).transpose(1, 2)
        k, v = self.kv(text).view(b, text.shape[1], 2, heads, dh).permute(2, 0, 3, 1, 4)
        has_text = None
        attn_mask = None
        if text_mask is not None:
            # A caption with no real token would softmax over nothing (NaN): attend to all, then zero it.
            has_text = text_mask.any(dim=1)
            attn_mask = (text_mask | ~has_text[:, None])[:, None, None, :]
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        out = self.proj(out.transpose(1, 2).reshape(b, n, d))
        return out if has_text is None else out * has_text[:, None, None].to(out.dtype)


class DiTBlock(nn.Module):
    """Self-attention, optional cross-attention, MLP; adaLN-Zero shift/scale/gate from the condition c."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, cross_attention: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads)
        self.cross_attn = CrossAttention(hidden_size, num_heads) if cross_attention else None
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, mlp_hidden), nn.GELU(approximate="tanh"),
                                 nn.Linear(mlp_hidden, hidden_size))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor, text: Tensor | None, text_mask: Tensor | None) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if self.cross_attn is not None:
            x = x + self.cross_attn(x, text, text_mask)
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class LatentPatchDiT(ModelMixin, ConfigMixin):
    """Diffusion transformer whose last two input channels are coordinates (x, y) on the full latent grid."""

    # The pipeline hands the input over in float32: positions come from the coordinates in float32 even when
    # the weights are bf16/fp16 (a low-precision grid would round neighbouring positions together).
    keeps_float32_coordinates = True

    @register_to_config
    def __init__(self, in_channels: int = 4, hidden_size: int = 384, depth: int = 12, num_heads: int = 6,
                 patch_size: int = 2, mlp_ratio: float = 4.0, num_classes: int = 0, text_dim: int = 0,
                 pooled_text_dim: int = 0) -> None:
        super().__init__()
        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.pos_embedder = CoordinatePositionEmbedding(hidden_size, patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size) if num_classes > 0 else None
        self.pooled_embedder = nn.Linear(pooled_text_dim, hidden_size) if pooled_text_dim > 0 else None
        self.text_embedder = nn.Linear(text_dim, hidden_size) if text_dim > 0 else None
        self.blocks = nn.ModuleList(DiTBlock(hidden_size, num_heads, mlp_ratio, cross_attention=text_dim > 0)
                                    for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)

    def _condition_vector(self, labels: Tensor | None, pooled: Tensor | None, batch: int,
                          device: torch.device) -> Tensor | float:
        c: Tensor | float = 0.0
        if self.y_embedder is not None:
            if labels is None:  # no label given: the null label, i.e. unconditional
                labels = torch.full((batch,), self.config.num_classes, dtype=torch.long, device=device)
            c = c + self.y_embedder(labels)
        if self.pooled_embedder is not None:
            if pooled is None:
                raise ValueError("this DiT takes the pooled text embedding: pass pooled_projections")
            c = c + self.pooled_embedder(pooled.to(self.pooled_embedder.weight.dtype))
        return c

    def unpatchify(self, x: Tensor, th: int, tw: int) -> Tensor:
        p, c = self.config.patch_size, self.config.in_channels
        x = x.reshape(x.shape[0], th, tw, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, th * p, tw * p)

    def forward(self, hidden_states: Tensor, timestep: Tensor, class_labels: Tensor | None = None,
                encoder_hidden_states: Tensor | None = None, encoder_attention_mask: Tensor | None = None,
                pooled_projections: Tensor | None = None, return_dict: bool = True):
        b, channels, h, w = hidden_states.shape
        p, latent_channels = self.config.patch_size, self.config.in_channels
        if channels != latent_channels + 2:
            raise ValueError(f"expected {latent_channels} latent + 2 coordinate channels, got {channels}")
        if h % p or w % p:
            raise ValueError(f"latent size {h}x{w} is not divisible by the patch size {p}")
        latents, coords = hidden_states[:, :latent_channels], hidden_states[:, latent_channels:]
        latents = latents.to(self.x_embedder.weight.dtype)
        tokens = self.x_embedder(latents).flatten(2).transpose(1, 2).contiguous()
        tokens = tokens + self.pos_embedder(coords).to(tokens.dtype)
        timestep = torch.as_tensor(timestep, device=hidden_states.device).reshape(-1).expand(b)
        c = self.t_embedder(timestep) + self._condition_vector(class_labels, pooled_projections, b,
                                                               hidden_states.device)
        text, text_mask = None, None
        if self.text_embedder is not None:
            if encoder_hidden_states is None:
                raise ValueError("this DiT is text-conditioned: pass encoder_hidden_states")
            text = self.text_embedder(encoder_hidden_states.to(self.text_embedder.weight.dtype))
            text_mask = None if encoder_attention_mask is None else encoder_attention_mask.bool()
        for block in self.blocks:
            tokens = block(tokens, c, text, text_mask)
        out = self.unpatchify(self.final_layer(tokens, c), h // p, w // p)
        return Transformer2DModelOutput(sample=out) if return_dict else (out,)
