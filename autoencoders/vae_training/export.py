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

from latentpatch.checkpoints import optimizer_from_tensors, optimizer_to_tensors
from latentpatch.config import differences
from latentpatch.errors import UserError
from latentpatch.io import atomic_save_safetensors

from .colour_check import QUICK_SET, describe

STATE_FILE = "training/state.safetensors"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"


def save_state(out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator,
               step: int, config: dict[str, Any]) -> None:
    """Model, Adam moments (in the trainer's checkpoint format) and the data/noise generator in one file,
    written atomically."""
    opt_tensors, opt_meta = optimizer_to_tensors(optimizer)
    tensors = {**{f"model.{k}": v for k, v in model.state_dict().items()},
               **{f"optim.{k}": v for k, v in opt_tensors.items()}, "rng": generator.get_state()}
    meta = {"step": str(step), "config": json.dumps(config), **opt_meta}
    atomic_save_safetensors(tensors, out / STATE_FILE, metadata=meta)


def load_state(out: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator,
               config: dict[str, Any], ignore: tuple[str, ...]) -> int:
    """Restore a save_state file into the given objects; returns its step. The recipe must match but for `ignore`
    (the run folder's own check, config.differences)."""
    path = out / STATE_FILE
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata()
        tensors = load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise UserError(f"cannot resume: {path} is missing or unreadable ({e}); start without --resume") from e
    if "optimizer" not in meta:
        raise UserError(f"cannot resume {out}: {path} was written by an older train-vae; start without --resume")
    diff = differences(json.loads(meta["config"]), config, ignore)
    if diff:
        raise UserError(f"cannot resume {out}: it was trained with other settings ({'; '.join(diff)}); resume with "
                        "the same options, or start without --resume")
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    optimizer.load_state_dict(optimizer_from_tensors({k[6:]: v for k, v in tensors.items() if k.startswith("optim.")},
                                                     meta))
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
    """README.md for the exported folder: how it was made, how well it reconstructs held-out photographs, and how
    closely it gives back flat colours."""
    r = report
    held = ", ".join(r["held_out"]) or "none"
    arch = r["architecture"]
    init = r["init"] or (f"random (seed {r['seed']}), every ResNet block starting as the identity, "
                         "posterior log-variance bias -8")
    rows = [(f"| held out of the training images ({held}) | {_num(r['heldout_psnr'], '.2f', ' dB')} | "
             f"{_num(r['heldout_ssim'], '.4f')} |")]
    ref = r.get("reference")
    if ref:
        rows.append(f"| scikit-learn's sample photographs (china, flower), never trained on | {ref['psnr']:.2f} dB | "
                    f"{ref['ssim']:.4f} |")
        rows += [f"| - {n} only | {v['psnr']:.2f} dB | {v['ssim']:.4f} |" for n, v in ref["by_image"].items()]
    history = ", ".join(f"{h['step']}: {h['heldout_psnr']:.2f}" for h in r["history"]) or "none"
    colours = ", ".join(f"{h['step']}: {h['colour_worst']:.3f}" for h in r["history"] if "colour_worst" in h)
    return f"""# {r['name']}

A diffusers `AutoencoderKL` trained by `latentpatch train-vae`: downsampling factor {arch['factor']},
{arch['latent_channels']} latent channels, block_out_channels {arch['block_out_channels']},
layers_per_block {arch['layers_per_block']}, norm_num_groups {arch['norm_num_groups']},
mid-block attention {'on' if arch['mid_block_add_attention'] else 'off'}; {arch['parameters']:,} parameters,
stored in float16.

Load it like any Stable Diffusion VAE: `AutoencoderKL.from_pretrained(folder)`, or in latentpatch
`load_autoencoder(folder)`{' / `load_autoencoder("builtin")`' if r.get('builtin') else ''}.

## Held-out reconstruction

| crops of {r['eval_crop']} x {r['eval_crop']} pixels at native resolution | PSNR (mean over crops) | SSIM (mean over crops) |
| --- | --- | --- |
{chr(10).join(rows)}

{r['eval_crops']} crops from each set, taken from its images in turn at positions fixed by seed {r['eval_seed']}
(`vae_data.fixed_crops`), reconstructed from the posterior mean after saving in float16 and loading back.
PSNR on the [0, 1] scale; SSIM with an 11x11 Gaussian window (sigma 1.5), valid region, mean over channels.
Held-out PSNR during training (dB, float32 weights), by step: {history}.
{f"Worst flat-colour channel error during training ({describe(**QUICK_SET)}; 32 px), by step: {colours}." if colours else ""}

{_colour_section(r.get('colour_check'))}
## Recipe

- command: `{r['command']}`
- data: {r['data']}; {len(r['train_images'])} training images: {', '.join(r['train_images'])}
- held out (by image, never trained on): {held}
- init: {init}; trained parameters: {r['train']}
- {r['steps']} steps of batch {r['batch_size']}, random {r['crop']} x {r['crop']} crops (pyramid levels 1, 0.71, 0.5,
  left-right flips), seed {r['seed']}
- colour augmentation: {_augmentation(r)}
- loss: L1 + {r['mse_weight']} MSE{f" + {r['edge_weight']} L1 of Sobel gradients" if r['edge_weight'] else ""}
  + {r['kl_weight']} KL per latent element
- Adam, lr {r['lr']} with {r['warmup']} warm-up steps then cosine decay to {r['lr'] * r['min_lr_ratio']:g};
  gradient norm clipped to 1
- scaling_factor {r['scaling_factor']:.6f} (latent std {1 / r['scaling_factor']:.4f}): {r['scaling_note']}
- wall-clock {r['seconds'] / 60:.1f} min on {r['device']}
"""


def _num(value: float | None, fmt: str, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:{fmt}}{unit}"


def _augmentation(r: dict[str, Any]) -> str:
    jitter, fields = r.get("colour_jitter", 0), r.get("colour_fields", 0)
    if not jitter and not fields:
        return "none"
    lo, hi = r["saturation"]
    return (f"{jitter:.0%} of the crops recoloured (colour crops turned by a hue angle uniform over the whole circle, "
            f"saturation scaled by a log-uniform factor in [{lo:g}, {hi:g}], kornia.enhance.adjust_hue / "
            f"adjust_saturation; greyscale crops painted through a gradient map between two random colours), then "
            f"{fields:.0%} of the crops replaced by flat or smooth random colour fields")


def _colour_section(c: dict[str, Any] | None) -> str:
    if not c:
        return ""
    worst, mean = (" | ".join(f"{x:.3f}" for x in c[k]) for k in ("worst", "mean"))
    want, got = (", ".join(f"{x:+.2f}" for x in v) for v in c["worst_field"])
    return f"""## Flat colours

{c['fields']} flat {c['side']} x {c['side']} fields (`colour_check.flat_colours`: {describe()}), encoded and
decoded; each field is scored by its mean decoded colour, on the [-1, 1] scale.

| | R | G | B |
| --- | --- | --- | --- |
| worst channel error | {worst} |
| mean channel error | {mean} |

CIE76 ΔE in CIELAB (kornia.color.rgb_to_lab, D65): mean {c['delta_e_mean']:.2f}, worst {c['delta_e_max']:.2f}.
Worst field: ({want}) comes back ({got}).
"""
