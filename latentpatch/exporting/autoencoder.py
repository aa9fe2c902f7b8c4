"""The autoencoder a run decodes with (run.json's record), as the export's vae/ and the latent normalisation."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class ExportedAutoencoder:
    vae: Any  # a diffusers AutoencoderKL / AutoencoderTiny; None for the pixel "autoencoder" (latents are pixels)
    factor: int  # pixels per latent pixel
    scaling_factor: float  # latents are normalised as z_n = (z - shift) * scale (latentpatch.autoencoders)
    shift_factor: float


def export_autoencoder(info: dict[str, Any]) -> ExportedAutoencoder:
    """The recorded autoencoder in float32 with the recorded normalisation in its config (a run may have
    overridden the VAE's own scaling_factor / shift_factor when it encoded)."""
    from latentpatch.autoencoders import load_autoencoder_from_info

    ae = load_autoencoder_from_info(info, device="cpu", dtype=torch.float32)
    vae = getattr(ae, "model", None)
    if vae is not None:
        vae.register_to_config(scaling_factor=ae.info.scaling_factor, shift_factor=ae.info.shift_factor)
    return ExportedAutoencoder(vae, ae.info.factor, ae.info.scaling_factor, ae.info.shift_factor)
