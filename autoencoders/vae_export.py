"""What `train-vae` writes: the resumable training state, and the final diffusers folder (config.json with the
data's scaling factor, fp16 safetensors, model card) that loads like any Stable Diffusion VAE."""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from latentpatch.errors import UserError
from latentpatch.io import atomic_save_safetensors

STATE_FILE = "training/state.safetensors"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def save_state(out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator,
               step: int, config: dict[str, Any]) -> None:
    """Model, Adam moments and the data/noise generator in one file, written atomically."""
    tensors = {f"model.{k}": v for k, v in model.state_dict().items()}
    for i, state in optimizer.state_dict()["state"].items():
        tensors.update({f"optim.{i}.{k}": torch.as_tensor(v) for k, v in state.items()})
    tensors["rng"] = generator.get_state()
    meta = {"step": str(step), "config": json.dumps(config)}
    atomic_save_safetensors(tensors, out / STATE_FILE, metadata=meta)


def load_state(out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator,
               config: dict[str, Any], ignore: tuple[str, ...]) -> int:
    """Restore a save_state file into the given objects; returns its step. The recipe must match but for `ignore`."""
    path = out / STATE_FILE
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise UserError(f"cannot resume: {path} is missing or unreadable ({e}); start without --resume") from e
    saved = json.loads(meta["config"])
    for key, value in config.items():
        if key not in ignore and saved.get(key) != value:
            raise UserError(f"cannot resume {out}: it was trained with {key}={saved.get(key)!r}, not {value!r}")
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state = optimizer.state_dict()
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, i, name = key.split(".", 2)
            state["state"].setdefault(int(i), {})[name] = value
    optimizer.load_state_dict(state)
    generator.set_state(tensors["rng"])
    return int(meta["step"])


def export_vae(model: torch.nn.Module, out: Path, scaling_factor: float, dtype: torch.dtype = torch.float16) -> None:
    """config.json (scaling_factor from the data, shift_factor null) + weights in `dtype`, replacing any earlier
    export in `out` file by file, so a reader never sees a config without its weights' new values half-written."""
    export = copy.deepcopy(model).to("cpu")
    for t in (*export.parameters(), *export.buffers()):  # tensor by tensor: Module.to(dtype) warns in diffusers
        t.data = t.data.to(dtype)
    export.register_to_config(scaling_factor=float(scaling_factor), shift_factor=None)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".export-", dir=out))
    try:
        export.save_pretrained(tmp, safe_serialization=True)
        for name in (WEIGHTS_NAME, "config.json"):  # weights first: the config names what they hold
            os.chmod(tmp / name, 0o644)  # readable by all, like any installed package file
            os.replace(tmp / name, out / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def model_card(report: dict[str, Any]) -> str:
    """README.md for the exported folder: how it was made and how well it reconstructs held-out images."""
    r = report
    held = ", ".join(r["held_out"]) or "none"
    psnr = "n/a" if r["heldout_psnr"] is None else f"{r['heldout_psnr']:.2f} dB"
    ssim = "n/a" if r["heldout_ssim"] is None else f"{r['heldout_ssim']:.4f}"
    arch = r["architecture"]
    init = r["init"] or (f"random (seed {r['seed']}), every ResNet block starting as the identity, "
                         "posterior log-variance bias -8")
    return f"""# {r['name']}

A diffusers `AutoencoderKL` trained by `latentpatch train-vae`: downsampling factor {arch['factor']},
{arch['latent_channels']} latent channels, block_out_channels {arch['block_out_channels']},
layers_per_block {arch['layers_per_block']}, norm_num_groups {arch['norm_num_groups']},
mid-block attention {'on' if arch['mid_block_add_attention'] else 'off'}; {arch['parameters']:,} parameters,
stored in float16.

Load it like any Stable Diffusion VAE: `AutoencoderKL.from_pretrained(folder)`, or in latentpatch
`load_autoencoder(folder)`{' / `load_autoencoder("builtin")`' if r.get('builtin') else ''}.

## Held-out reconstruction

| metric | value |
| --- | --- |
| PSNR (mean over crops) | {psnr} |
| SSIM (mean over crops, 11x11 Gaussian window, valid region) | {ssim} |

Measured on {r['eval_crops']} crops of {r['eval_crop']} x {r['eval_crop']} pixels at native resolution from the held-out
images ({held}), with the posterior mean, after saving in float16 and loading back.

## Recipe

- command: `{r['command']}`
- data: {r['data']}; {len(r['train_images'])} training images: {', '.join(r['train_images'])}
- held out (by image, never trained on): {held}
- init: {init}; trained parameters: {r['train']}
- {r['steps']} steps of batch {r['batch_size']}, random {r['crop']} x {r['crop']} crops (pyramid levels 1, 0.71, 0.5,
  left-right flips), seed {r['seed']}
- loss: L1 + {r['mse_weight']} MSE + {r['edge_weight']} L1 of Sobel gradients + {r['kl_weight']} KL per latent element
- Adam, lr {r['lr']} with {r['warmup']} warm-up steps then cosine decay to {r['lr'] * r['min_lr_ratio']:g};
  gradient norm clipped to 1
- scaling_factor {r['scaling_factor']:.6f}: {r['scaling_note']}
- wall-clock {r['seconds'] / 60:.1f} min on {r['device']}
"""
