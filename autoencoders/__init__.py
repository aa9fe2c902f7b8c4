"""Autoencoders: images in [-1, 1] <-> normalised latents z_n = (z - shift) * scale, one interface for all."""

from .base import Autoencoder, resolve_dtype
from .info import AutoencoderInfo, describe_autoencoder, same_latent_space
from .loading import BUILTIN_NAME, builtin_folder, folder_revision, load_autoencoder, load_autoencoder_from_info
from .pixel import PixelAutoencoder

__all__ = [
    "Autoencoder", "AutoencoderInfo", "describe_autoencoder", "same_latent_space", "PixelAutoencoder", "BUILTIN_NAME", "builtin_folder", "folder_revision",
    "load_autoencoder", "load_autoencoder_from_info", "resolve_dtype",
]
