"""The tensors a denoiser is conditioned on, in one object, so every network has the same call signature."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class Conditioning:
    """Batched conditioning; fields a network was not built for are ignored.

    Classifier-free guidance drops a label by setting it to `num_classes` (the null label) and a caption by
    using the empty caption's embedding; the caller does the dropping, so the network stays deterministic.
    """

    class_labels: Tensor | None = None   # [B] long; value num_classes means "null" (dropped) label
    text_tokens: Tensor | None = None    # [B, L, D] token embeddings for cross-attention
    text_mask: Tensor | None = None      # [B, L] bool, True = real token
    text_pooled: Tensor | None = None    # [B, D]

    def _map(self, fn) -> Conditioning:
        return Conditioning(**{f.name: None if (v := getattr(self, f.name)) is None else fn(v)
                               for f in dataclasses.fields(self)})

    def select(self, rows: Tensor | slice) -> Conditioning:
        """The rows `rows` of every field (an index tensor or a slice)."""
        return self._map(lambda v: v[rows.to(v.device) if isinstance(rows, Tensor) else rows])

    def to(self, device: torch.device | str) -> Conditioning:
        return self._map(lambda v: v.to(device, non_blocking=True))


def cat_conditioning(a: Conditioning, b: Conditioning) -> Conditioning:
    """Field-wise concatenation along the batch; a field None in both stays None."""
    out = {}
    for f in dataclasses.fields(Conditioning):
        va, vb = getattr(a, f.name), getattr(b, f.name)
        if (va is None) != (vb is None):
            raise ValueError(f"cannot batch conditionings: {f.name} is set in one and None in the other")
        out[f.name] = None if va is None else torch.cat([va, vb], dim=0)
    return Conditioning(**out)
