"""What a denoiser may be conditioned on, in one object so every network has the same call signature."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor


@dataclass
class Conditioning:
    """Batched conditioning; fields a network was not built for are ignored.

    Classifier-free guidance drops a label by setting it to `num_classes` (the null label); the caller
    does the dropping, so the network stays deterministic.
    """

    class_labels: Tensor | None = None   # [B] long; value num_classes means "null" (dropped) label
    text_tokens: Tensor | None = None    # [B, L, D] token embeddings for cross-attention
    text_mask: Tensor | None = None      # [B, L] bool, True = real token
    text_pooled: Tensor | None = None    # [B, D]
