"""DiT (Peebles & Xie 2023) for Patch Diffusion: adaLN-Zero blocks, positions from coordinate channels.

Follows facebookresearch/DiT models.py, with four changes: the position embedding is computed from the
coordinate channels (so a crop knows where it is on the full grid), optional PixArt-alpha cross-attention
on text tokens, optional TREAD token routing in training (models.routing), and an EDM-style call signature
`net(x[B, C+2, h, w], c_noise[B], cond) -> [B, C, h, w]`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from latentpatch.conditioning import Conditioning
from latentpatch.errors import UserError
from latentpatch.models.attention import attention
from latentpatch.models.embeddings import CoordinatePositionEmbedding, LabelEmbedder, TimestepEmbedder
from latentpatch.models.routing import TokenRoute, route_in, route_out


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class SelfAttention(nn.Module):
    """Multi-head self-attention over the image tokens."""

    def __init__(self, hidden_size: int, num_heads: int, backend: str) -> None:
        super().__init__()
        self.num_heads, self.backend = num_heads, backend
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.project(attention(*self.heads(x), backend=self.backend))

    def heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v [B, heads, n, d / heads] of the tokens x [B, n, d] (apart, so a sampling cache can keep k, v)."""
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        return q, k, v

    def project(self, out: Tensor) -> Tensor:
        """The heads' outputs [B, heads, n, d / heads] -> [B, n, d]."""
        b, _, n, _ = out.shape
        return self.proj(out.transpose(1, 2).reshape(b, n, -1))


class CrossAttention(nn.Module):
    """PixArt-alpha cross-attention: queries from the (pre-LN) image tokens, keys/values from text tokens.

    `proj` is zero-initialised by DiT.initialize_weights, so each layer starts as the identity.
    """

    def __init__(self, hidden_size: int, num_heads: int, backend: str) -> None:
        super().__init__()
        self.num_heads, self.backend = num_heads, backend
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
        if text_mask is not None:
            # A caption with no real token would softmax over nothing (NaN): attend to all, then zero it.
            has_text = text_mask.any(dim=1)
            text_mask = text_mask | ~has_text[:, None]
        out = attention(q, k, v, mask=text_mask, backend=self.backend)
        out = self.proj(out.transpose(1, 2).reshape(b, n, d))
        return out if has_text is None else out * has_text[:, None, None].to(out.dtype)


class DiTBlock(nn.Module):
    """Self-attention, optional cross-attention, MLP; adaLN-Zero shift/scale/gate from the condition c."""

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_ratio: float, backend: str, cross_attention: bool
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads, backend)
        self.cross_attn = CrossAttention(hidden_size, num_heads, backend) if cross_attention else None
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden), nn.GELU(approximate="tanh"), nn.Linear(mlp_hidden, hidden_size)
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor, text: Tensor | None, text_mask: Tensor | None) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa[:, None] * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        if self.cross_attn is not None:
            x = x + self.cross_attn(x, text, text_mask)
        return x + gate_mlp[:, None] * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    """adaLN then a linear map from each token to its p x p x C output patch."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion transformer over latent crops; the last two input channels are coordinates (x, y)."""

    def __init__(
        self,
        in_channels: int,
        *,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        patch_size: int = 2,
        mlp_ratio: float = 4.0,
        num_classes: int = 0,
        text_dim: int = 0,
        pooled_text_dim: int = 0,
        attention_backend: str = "sdpa",
        grad_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels, self.patch_size, self.num_classes = in_channels, patch_size, num_classes
        self.attention_backend = attention_backend
        self.grad_checkpointing = grad_checkpointing

        self.x_embedder = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)
        self.pos_embedder = CoordinatePositionEmbedding(hidden_size, patch_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        # Conditioning modules exist only when configured: an unconditional model has no unused weights.
        self.y_embedder = LabelEmbedder(num_classes, hidden_size) if num_classes > 0 else None
        self.pooled_embedder = nn.Linear(pooled_text_dim, hidden_size) if pooled_text_dim > 0 else None
        self.text_embedder = nn.Linear(text_dim, hidden_size) if text_dim > 0 else None
        self.blocks = nn.ModuleList(
            DiTBlock(hidden_size, num_heads, mlp_ratio, attention_backend, cross_attention=text_dim > 0)
            for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """DiT's initialisation: xavier linears, small embeddings, and the zeros that make adaLN-Zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.weight.data  # patch embedding initialised like a linear layer
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        # Zero-init: adaLN modulation (gates 0, so every block starts as the identity) and the
        # cross-attention output projection (so text adds nothing until trained).
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
            if block.cross_attn is not None:
                nn.init.zeros_(block.cross_attn.proj.weight)
                nn.init.zeros_(block.cross_attn.proj.bias)
        # Zero-init: the final layer, so the network outputs exactly 0 at the start.
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def _condition_vector(self, cond: Conditioning | None, batch: int, device: torch.device) -> Tensor | float:
        """Class label and pooled text, summed into the adaLN condition (the timestep is added by forward)."""
        c: Tensor | float = 0.0
        if self.y_embedder is not None:
            labels = None if cond is None else cond.class_labels
            if labels is None:  # no label given: the null label, i.e. unconditional
                labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=device)
            c = c + self.y_embedder(labels)
        if self.pooled_embedder is not None:
            if cond is None or cond.text_pooled is None:
                raise UserError("this model was built with model.pooled_text_dim > 0; pass cond.text_pooled")
            c = c + self.pooled_embedder(cond.text_pooled.to(self.pooled_embedder.weight.dtype))
        return c

    def _text(self, cond: Conditioning | None) -> tuple[Tensor | None, Tensor | None]:
        if self.text_embedder is None:
            return None, None
        if cond is None or cond.text_tokens is None:
            raise UserError("this model was built with model.text_dim > 0; pass cond.text_tokens")
        mask = None if cond.text_mask is None else cond.text_mask.bool()
        return self.text_embedder(cond.text_tokens.to(self.text_embedder.weight.dtype)), mask

    def unpatchify(self, x: Tensor, th: int, tw: int) -> Tensor:
        """[B, th*tw, p*p*C] -> [B, C, th*p, tw*p]."""
        p, c = self.patch_size, self.in_channels
        x = x.reshape(x.shape[0], th, tw, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, th * p, tw * p)

    def forward(self, x: Tensor, c_noise: Tensor, cond: Conditioning | None = None,
                route: TokenRoute | None = None) -> Tensor:
        """`route` (training only): the tokens that go through blocks route.start..route.end (TREAD)."""
        b, channels, h, w = x.shape
        p = self.patch_size
        if channels != self.in_channels + 2:
            raise UserError(f"DiT expects {self.in_channels} latent + 2 coordinate channels, got {channels}")
        if h % p or w % p:
            raise UserError(f"latent size {h}x{w} is not divisible by the DiT patch size {p}; "
                            f"use patch/crop sizes that are multiples of {p}")
        latents, coords = x[:, : self.in_channels], x[:, self.in_channels :]
        # [B, T, D], row-major tokens. The conv's output is [B, D, T] in memory: made contiguous once here, or
        # every residual add would keep that layout and every LayerNorm copy its input, forward and backward.
        tokens = self.x_embedder(latents).flatten(2).transpose(1, 2).contiguous()
        tokens = tokens + self.pos_embedder(coords).to(tokens.dtype)
        c = self.t_embedder(c_noise) + self._condition_vector(cond, b, x.device)
        text, text_mask = self._text(cond)
        for i, block in enumerate(self.blocks):
            if route is not None and i == route.start:
                before, tokens = tokens, route_in(tokens, route)
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(block, tokens, c, text, text_mask, use_reentrant=False)
            else:
                tokens = block(tokens, c, text, text_mask)
            if route is not None and i == route.end:
                tokens = route_out(tokens, before, route)
        return self.unpatchify(self.final_layer(tokens, c), h // p, w // p)
