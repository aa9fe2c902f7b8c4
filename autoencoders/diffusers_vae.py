"""diffusers AutoencoderKL (SD 1.x/2.x, SDXL, SD3, FLUX VAEs) and AutoencoderTiny (TAESD family).

AutoencoderTiny, checked in diffusers' source: `encode` returns the encoder output unchanged;
`latent_magnitude`/`latent_shift` are used only by `scale_latents`/`unscale_latents`, which map
latents to [0, 1] for uint8 storage in `forward`. TAESD models are trained to reproduce their big
VAE's latents *already normalised*, hence their configs carry scaling_factor 1.0 and shift 0.0,
and the one formula z_n = (z - shift) * scale with those values gives the same space as the big VAE.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from diffusers import AutoencoderKL, AutoencoderTiny
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError
from torch import Tensor

from latentpatch.errors import UserError
from latentpatch.hub import load_kwargs

from .base import Autoencoder
from .info import AutoencoderInfo

CLASS_KINDS = {"AutoencoderKL": "kl", "AutoencoderTiny": "tiny"}
KIND_CLASSES: dict[str, type] = {"kl": AutoencoderKL, "tiny": AutoencoderTiny}
# What diffusers and huggingface_hub raise for a missing folder, file, cache entry or bad hub id
# (EnvironmentError is OSError; LocalEntryNotFoundError is also a FileNotFoundError).
LOAD_ERRORS = (OSError, LocalEntryNotFoundError, HFValidationError)


def detect_kind(config: dict[str, Any], kind: str | None, where: str) -> str:
    """The kind named by config.json's _class_name; an explicit `kind` must agree with it."""
    name = config.get("_class_name")
    if name is not None and name not in CLASS_KINDS:
        raise UserError(f"{where} holds a {name}; supported autoencoder classes are {sorted(CLASS_KINDS)}")
    found = CLASS_KINDS.get(name) if name else None
    if kind is not None and kind not in KIND_CLASSES:
        raise UserError(f"autoencoder kind {kind!r} is not valid for {where}; use one of {sorted(KIND_CLASSES)}")
    if kind is not None and found is not None and kind != found:
        raise UserError(f"{where} holds a {name} (kind {found!r}) but kind {kind!r} was requested")
    return kind or found or "kl"


def vae_factor(kind: str, config: Any) -> int:
    """Spatial downsampling factor from the model's full config."""
    if kind == "kl":
        # Encoder: every DownEncoderBlock2D but the last halves the resolution.
        return 2 ** (len(config.block_out_channels) - 1)
    # EncoderTiny: every block after the first starts with a stride-2 conv; DecoderTiny upsamples
    # by upsampling_scaling_factor between blocks. TAESD: 4 blocks -> 8.
    enc = 2 ** (len(config.encoder_block_out_channels) - 1)
    dec = config.upsampling_scaling_factor ** (len(config.decoder_block_out_channels) - 1)
    if enc != dec:
        raise UserError(f"AutoencoderTiny config downsamples by {enc} but upsamples by {dec}; it cannot round-trip")
    return enc


def load_diffusers_model(
    path_or_id: str, kind: str, dtype: torch.dtype, subfolder: str | None = None, revision: str | None = None
) -> torch.nn.Module:
    """from_pretrained, with every 'not found' turned into a UserError that says what to do."""
    try:
        cls = KIND_CLASSES[kind]
        return cls.from_pretrained(path_or_id, subfolder=subfolder, revision=revision, torch_dtype=dtype,
                                   **load_kwargs())
    except LOAD_ERRORS as e:
        where = f"{path_or_id}" + (f" (subfolder {subfolder})" if subfolder else "")
        raise UserError(
            f"could not load the autoencoder {where}: {str(e).splitlines()[0] if str(e) else type(e).__name__}. "
            "For a hub id, download it once with network access (it is then loaded offline from the cache), "
            "or pass a local diffusers folder."
        ) from e


def hub_config(repo_id: str, revision: str | None) -> tuple[dict[str, Any], str | None, str | None] | None:
    """(config, subfolder, commit hash) from the hub cache (or the hub when online); None if not found.
    Tries the repo root, then vae/ for a full pipeline repo."""
    for subfolder in (None, "vae"):
        try:
            config, commit = AutoencoderKL.load_config(
                repo_id, subfolder=subfolder, revision=revision, return_commit_hash=True
            )
        except (*LOAD_ERRORS, ValueError):
            continue
        return config, subfolder, commit
    return None


class DiffusersAutoencoder(Autoencoder):
    """A loaded diffusers VAE, frozen, on one device and dtype."""

    def __init__(self, model: torch.nn.Module, info: AutoencoderInfo, device: torch.device, dtype: torch.dtype):
        super().__init__(info, device, dtype)
        if next(model.parameters()).dtype != dtype:  # loaders pass torch_dtype; cast only what came otherwise
            model = model.to(dtype=dtype)
        self.model = model.to(device).eval().requires_grad_(False)

    @classmethod
    def from_model(
        cls, model: torch.nn.Module, kind: str, source: str, revision: str | None, device: torch.device,
        dtype: torch.dtype, scaling_factor: float | None = None, shift_factor: float | None = None,
    ) -> DiffusersAutoencoder:
        """Scaling and shift come from the VAE's config unless overridden; a None shift means 0."""
        cfg = model.config
        if getattr(cfg, "latents_mean", None) is not None or getattr(cfg, "latents_std", None) is not None:
            warnings.warn(
                f"{source} has per-channel latents_mean/latents_std in its config; latentpatch normalises with "
                "the scalar scaling_factor and shift_factor only",
                stacklevel=3,
            )
        scale = cfg.scaling_factor if scaling_factor is None else scaling_factor
        shift = getattr(cfg, "shift_factor", None) if shift_factor is None else shift_factor
        info = AutoencoderInfo(
            kind=kind, source=source, revision=revision, latent_channels=int(cfg.latent_channels),
            factor=vae_factor(kind, cfg), scaling_factor=float(scale), shift_factor=float(shift or 0.0),
        )
        return cls(model, info, device, dtype)

    def _encode_raw(self, images: Tensor) -> tuple[Tensor, Tensor | None]:
        if self.info.kind == "tiny":
            return self.model.encode(images).latents, None
        posterior = self.model.encode(images).latent_dist
        return posterior.mean, posterior.std

    def _decode_raw(self, raw: Tensor) -> Tensor:
        return self.model.decode(raw).sample
