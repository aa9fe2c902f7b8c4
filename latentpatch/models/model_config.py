"""The denoiser's configuration (re-exported by latentpatch.config as ModelConfig)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class ModelConfig:
    """Which denoiser to build and how big.

    A DiT `preset` ("DiT-S/2", "DiT-B/2", "DiT-L/2", "DiT-XL/2"; /4 and /8 too) sets depth, hidden_size,
    num_heads and patch_size and overrides those four fields; they are read only when preset is None.
    """

    arch: str = "dit"                      # "dit" | "unet"
    preset: str | None = None
    hidden_size: int = 384
    depth: int = 12
    num_heads: int = 6
    patch_size: int = 2
    mlp_ratio: float = 4.0
    num_classes: int = 0                   # 0 = unconditional; else label num_classes is the null label
    text_dim: int = 0                      # >0: cross-attention on text tokens of this width
    pooled_text_dim: int = 0               # >0: pooled text embedding added to the adaLN / time embedding
    attention: str = "auto"                # "auto" | "sdpa" | "xformers"
    grad_checkpointing: bool = False
    unet_block_out_channels: list[int] = field(default_factory=lambda: [64, 128, 128])
    unet_layers_per_block: int = 2
    unet_attention_levels: list[bool] = field(default_factory=lambda: [False, True, True])
    unet_attention_head_dim: int = 8
    # A widened pretrained diffusers UNet's config (set by latentpatch.finetuning); overrides the unet_* fields.
    unet_config: Any = None                # dict | None
    lora_rank: int = 0                     # >0: LoRA adapters of this rank on attention projections; base frozen
