"""The identity autoencoder, so the paper's pixel-space settings run through the same tools.

Pixels in [-1, 1] have a standard deviation of about 0.5, which is why EDM's sigma_data = 0.5 fits them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Autoencoder
from .info import AutoencoderInfo


class PixelAutoencoder(Autoencoder):
    """Factor 1, 3 channels; always float32 (there is no network, so a lower precision would only lose bits)."""

    def __init__(
        self, device: torch.device | str = "cpu", scaling_factor: float = 1.0, shift_factor: float = 0.0
    ) -> None:
        info = AutoencoderInfo(
            kind="pixel", source="pixel", revision=None, latent_channels=3, factor=1,
            scaling_factor=float(scaling_factor), shift_factor=float(shift_factor),
        )
        super().__init__(info, torch.device(device), torch.float32)

    def _encode_raw(self, images: Tensor) -> tuple[Tensor, None]:
        return images, None

    def _decode_raw(self, raw: Tensor) -> Tensor:
        return raw
