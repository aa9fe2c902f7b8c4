"""Tiny run folders of every kind latentpatch trains, for the export tests, written with the trainer's own
checkpoint writer: a DiT (unconditional, class-conditional, text through an open_clip tower), a UNet, and
fine-tunes of the tiny Stable Diffusion and DiT pipelines of tests/pretrained_helpers.py (with LoRA too).

Weights are random and every parameter is nudged (zero-initialised layers included, LoRA's B too), so no part
of a network is trivially zero; the EMA differs from the raw weights. The reference images come from
`lp.sample`, whose image i starts from the noise of a CPU generator seeded with image_seed(seed, i): the
exported pipeline gets the same generators (`generator=[...]`).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

import latentpatch
from latentpatch.autoencoders import PixelAutoencoder, load_autoencoder
from latentpatch.checkpoints import save_checkpoint
from latentpatch.conditioning import ConditioningSpec
from latentpatch.config import RunConfig, load_config, save_config
from latentpatch.denoiser import build_precond
from latentpatch.seeding import image_seed

TINY_DIT = ["model.dit.hidden_size=32", "model.dit.depth=2", "model.dit.num_heads=2", "model.dit.patch_size=2",
            "model.attention=sdpa", "edm.sigma_data=0.5"]
TINY_UNET = ["model.arch=unet", "model.unet.block_out_channels=[16,32]", "model.unet.attention_levels=[false,true]",
             "model.unet.attention_head_dim=8", "model.unet.layers_per_block=1", "model.attention=sdpa",
             "edm.sigma_data=0.5"]


def write_run(root: Path, cfg: RunConfig, latent_shape: list[int], *, autoencoder: dict[str, Any] | None = None,
              spec: ConditioningSpec = ConditioningSpec(), init_state: dict[str, torch.Tensor] | None = None,
              steps: tuple[int, ...] = (1,), heldout: dict[int, float] | None = None, images: int = 24) -> Path:
    """A run folder: config.yaml, run.json, a checkpoint per step in `steps` (the last one LATEST; with
    `heldout` {step: loss} the lowest is BEST and log.jsonl records each)."""
    root.mkdir(parents=True, exist_ok=True)
    save_config(cfg, root / "config.yaml")
    autoencoder = autoencoder or PixelAutoencoder().info.to_dict()
    factor = int(autoencoder["factor"])
    info = {"format_version": 1, "latents": str(root / "latents"), "autoencoder": autoencoder,
            "latent_shape": list(latent_shape), "buckets": None,
            "resolution": [latent_shape[1] * factor, latent_shape[2] * factor],
            "store": {"identity": "test", "images": images}, "conditioning": spec.to_dict(),
            "created": "2025-01-01T00:00:00", "latentpatch_version": latentpatch.__version__}
    (root / "run.json").write_text(json.dumps(info, indent=1))
    gen = torch.Generator().manual_seed(1234)
    model = build_precond(cfg, latent_shape[0], device="cpu", init_state=init_state)
    best = min(heldout, key=heldout.get) if heldout else None
    log = []
    for step in steps:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        ema = copy.deepcopy(model)
        with torch.no_grad():
            for p in ema.parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
        save_checkpoint(root, step, model, ema, torch.optim.AdamW(model.parameters()), {"nimg": 0},
                        best=step == best)
        if heldout:
            log.append({"step": step, "loss": 1.0, "heldout_loss": heldout[step]})
    if log:
        (root / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
    return root


def text_encoder_record(clip_json: Path, **features: str) -> dict[str, Any]:
    from latentpatch.text.loader import load_text_encoder

    return load_text_encoder(str(clip_json), None, **features).record


def dit_run(root: Path, *, num_classes: int = 0, text: dict[str, Any] | None = None, side: int = 8,
            overrides: tuple[str, ...] = (), **kw: Any) -> Path:
    """A 2-block DiT on 3 x side x side pixel "latents"; `text`: an open_clip record (cross-attention and the
    pooled embedding)."""
    extra = [f"model.num_classes={num_classes}"]
    if text is not None:
        extra += [f"model.text_dim={text['width']}", f"model.pooled_text_dim={text['pooled_dim']}"]
    cfg = load_config(None, TINY_DIT + extra + list(overrides))
    spec = ConditioningSpec(num_classes, tuple(f"class{k}" for k in range(num_classes)) or None, text,
                            pooled=text is not None)
    return write_run(root, cfg, [3, side, side], spec=spec, **kw)


def unet_run(root: Path, vae_folder: Path, *, text: dict[str, Any] | None = None, num_classes: int = 0) -> Path:
    """A 2-level UNet trained here on the latents of the diffusers VAE in `vae_folder` (4 x 8 x 8)."""
    extra = [f"model.num_classes={num_classes}"]
    if text is not None:
        extra += [f"model.text_dim={text['width']}", f"model.pooled_text_dim={text['pooled_dim']}"]
    cfg = load_config(None, TINY_UNET + extra)
    spec = ConditioningSpec(num_classes, tuple(f"class{k}" for k in range(num_classes)) or None, text,
                            pooled=text is not None)
    return write_run(root, cfg, [4, 8, 8], autoencoder=load_autoencoder(vae_folder).info.to_dict(), spec=spec)


def finetune_run(root: Path, pipeline: Path, *, lora_rank: int = 0, widened: bool = False) -> Path:
    """A fine-tune of a tiny diffusers pipeline, as lp.finetune starts it (a UNet widened, a DiT stock, the base's
    own VP preconditioning and noise levels, its VAE and text encoder), with nudged weights. widened: a DiT as
    fine-tunes before the stock DiT were (coordinate channels on its patch embedding)."""
    from pretrained_helpers import widen_dit_base

    from latentpatch.finetuning.starting_points import diffusers_base, load_choice

    found = diffusers_base(str(pipeline), None, None)
    if widened:
        widen_dit_base(found)
    cfg = found.cfg
    cfg.edm.sigma_data, cfg.model.attention, cfg.model.lora_rank = 1.0, "sdpa", lora_rank
    text = None
    if found.text_choice is not None:
        text = load_choice(found.text_choice, "cpu").record
        cfg.model.text_dim = int(text["width"])
    classes = cfg.model.num_classes
    spec = ConditioningSpec(classes, tuple(str(k) for k in range(classes)) or None, text)
    run = write_run(root, cfg, [4, 8, 8], autoencoder=load_autoencoder(pipeline).info.to_dict(), spec=spec,
                    init_state=found.state)
    (run / "finetune.json").write_text(json.dumps(found.describe))
    return run


def generators(seed: int, n: int) -> list[torch.Generator]:
    """The generators `latentpatch sample --seed seed` draws images 0..n-1 from."""
    return [torch.Generator().manual_seed(image_seed(seed, i)) for i in range(n)]


def load_export(folder: Path) -> Any:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixels(images: Any) -> torch.Tensor:
    """A pipeline's "np" output as 8-bit values [N, 3, H, W] (what its "pil" output holds)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).mul(255).round()


def reference_latents(loaded: Any, seeds: list[int], *, prompts: list[str] | None = None,
                      class_labels: list[int] | None = None, size: tuple[int, int] | None = None, **options: Any):
    """latentpatch's own latents for these images of a loaded run, as `lp.sample` makes them
    (sampling.generate.sample_batch)."""
    from latentpatch.conditioning.requested import request_conditioning
    from latentpatch.sampling.latents import generate_latents

    c, h, w = loaded.info["latent_shape"]
    if size is not None:
        factor = int(loaded.info["autoencoder"]["factor"])
        h, w = size[0] // factor, size[1] // factor
    cond, uncond = request_conditioning(loaded.spec, loaded.text_encoder(), prompts, class_labels)
    edm = loaded.cfg.edm
    return generate_latents(loaded.precond, seeds, [c, h, w], cond, uncond, sigma_min=edm.sigma_min,
                            sigma_max=edm.sigma_max, coordinate_scale=loaded.cfg.patches.coordinate_scale, **options)
