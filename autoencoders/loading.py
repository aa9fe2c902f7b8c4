"""Turn a spec ("pixel", "builtin", a local diffusers folder or a hub id) into an Autoencoder."""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from latentpatch.errors import UserError
from latentpatch.io import sha256_file

from .base import Autoencoder, resolve_dtype
from .info import AutoencoderInfo
from .pixel import PixelAutoencoder

BUILTIN_NAME = "latentpatch-vae-f4-v2"
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
# Hub repo ids are "owner/name" made of letters, digits, "-", "_" and ".".
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def builtin_folder(name: str = BUILTIN_NAME) -> Path:
    """The diffusers folder of a VAE shipped inside the package, or a UserError if this install lacks it."""
    folder = WEIGHTS_DIR / name
    if not (folder / "config.json").is_file():
        raise UserError(
            f"the builtin VAE {name!r} is not shipped in this install (no {folder}/config.json); "
            "pass a hub id such as stabilityai/sd-vae-ft-mse or a local diffusers VAE folder instead"
        )
    return folder


def folder_revision(folder: Path) -> str | None:
    """sha256 of the weights diffusers loads from `folder` (safetensors preferred, as diffusers does);
    for several shards, the sha256 of their "name sha256" lines."""
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        return None
    if len(files) == 1:
        return sha256_file(files[0])
    lines = "".join(f"{f.name} {sha256_file(f)}\n" for f in files)
    return hashlib.sha256(lines.encode()).hexdigest()


def _vae_folder(path: Path, spec: str) -> Path:
    """The folder itself, or its vae/ subfolder when given a full pipeline folder."""
    if path.is_file():
        raise UserError(f"autoencoder {spec!r} is a file; pass the diffusers folder that holds config.json")
    for folder in (path, path / "vae"):
        if (folder / "config.json").is_file():
            return folder
    raise UserError(f"autoencoder folder {spec!r} has no config.json (nor vae/config.json); is it a diffusers VAE?")


def _load_folder(
    folder: Path, kind: str | None, dtype: torch.dtype, revision: str | None
) -> tuple[torch.nn.Module, str, str | None]:
    from .diffusers_vae import detect_kind, load_diffusers_model

    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"could not read {folder / 'config.json'}: {e}") from e
    kind = detect_kind(config, kind, str(folder))
    sha = folder_revision(folder)
    if revision is not None and sha != revision:
        warnings.warn(
            f"the weights in {folder} changed since they were recorded (sha256 {sha}, expected {revision}); "
            "latents encoded with the old weights may decode differently",
            stacklevel=3,
        )
    return load_diffusers_model(str(folder), kind, dtype), kind, sha


def _load_hub(
    repo_id: str, kind: str | None, dtype: torch.dtype, revision: str | None
) -> tuple[torch.nn.Module, str, str | None]:
    """Offline when HF_HUB_OFFLINE=1; a full pipeline repo is read from its vae/ subfolder."""
    from .diffusers_vae import detect_kind, hub_config, load_diffusers_model

    found = hub_config(repo_id, revision)
    if found is None:
        raise UserError(
            f"autoencoder {repo_id!r} is neither an existing local folder nor a hub model that could be loaded "
            f"(looked for config.json and vae/config.json{f' at revision {revision}' if revision else ''}; "
            "with HF_HUB_OFFLINE=1 only the Hugging Face cache is searched); "
            "download it once with network access, or pass a local diffusers folder"
        )
    config, subfolder, commit = found
    kind = detect_kind(config, kind, repo_id)
    model = load_diffusers_model(repo_id, kind, dtype, subfolder=subfolder, revision=revision)
    return model, kind, commit or revision


def load_autoencoder(
    spec: str | os.PathLike, *, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
    kind: str | None = None, scaling_factor: float | None = None, shift_factor: float | None = None,
    revision: str | None = None,
) -> Autoencoder:
    """Load "pixel", "builtin" (or "builtin:NAME"), a local diffusers folder, or a hub id.

    kind is read from config.json's _class_name; scaling/shift from the config unless given.
    revision: for a hub id the branch, tag or commit; for a folder the expected sha256 of its
    weights (a mismatch warns). dtype defaults to bfloat16 on CUDA, float32 elsewhere.
    """
    spec = os.fspath(spec)
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise UserError(f"--device {device!r} is not a device torch knows (use cpu, cuda or cuda:N)") from e
    if spec == "pixel" or kind == "pixel":
        if spec != "pixel":
            raise UserError(f"kind 'pixel' takes the spec 'pixel', not {spec!r}")
        return PixelAutoencoder(device, 1.0 if scaling_factor is None else scaling_factor, shift_factor or 0.0)
    from .diffusers_vae import DiffusersAutoencoder  # diffusers is imported only when a VAE is loaded

    dtype = resolve_dtype(dtype, device)
    path = Path(spec).expanduser()
    if spec == "builtin" or spec.startswith("builtin:"):
        name = spec.partition(":")[2] or BUILTIN_NAME
        source = f"builtin:{name}"
        model, kind, rev = _load_folder(builtin_folder(name), kind, dtype, revision)
    elif path.exists():
        folder = _vae_folder(path, spec).resolve()
        source = str(folder)
        model, kind, rev = _load_folder(folder, kind, dtype, revision)
    elif HUB_ID.match(spec):
        source = spec
        model, kind, rev = _load_hub(spec, kind, dtype, revision)
    else:
        raise UserError(
            f"autoencoder {spec!r} not found: no such folder, and it is not a hub id (owner/name); "
            "pass 'pixel', a local diffusers VAE folder, or a hub id such as stabilityai/sd-vae-ft-mse"
        )
    return DiffusersAutoencoder.from_model(model, kind, source, rev, device, dtype, scaling_factor, shift_factor)


def load_autoencoder_from_info(info: AutoencoderInfo | dict[str, Any], **kw: Any) -> Autoencoder:
    """Reload the autoencoder recorded in a latent store, with its recorded normalisation; kw: device, dtype."""
    if isinstance(info, dict):
        info = AutoencoderInfo.from_dict(info)
    if Path(info.source).is_absolute() and not Path(info.source).exists():
        raise UserError(
            f"the autoencoder folder {info.source} recorded in the latent store no longer exists; "
            "restore it (or re-encode the data with an autoencoder you have)"
        )
    ae = load_autoencoder(
        info.source, kind=info.kind, scaling_factor=info.scaling_factor, shift_factor=info.shift_factor,
        revision=info.revision, **kw,
    )
    if (ae.info.latent_channels, ae.info.factor) != (info.latent_channels, info.factor):
        raise UserError(
            f"autoencoder {info.source} now has {ae.info.latent_channels} channels and factor {ae.info.factor}, "
            f"but {info.latent_channels} and {info.factor} were recorded"
        )
    return ae
