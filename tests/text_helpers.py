"""Offline text-conditioning test data: a tiny open_clip model config and captioned solid-colour images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": 0, "green": 1, "blue": 2}
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def write_clip_config(path: Path, **text_cfg) -> Path:
    """A CLIP config (text: 2 layers of width 32, context 77, open_clip's BPE vocabulary) with text_cfg changes."""
    cfg = json.loads(json.dumps(TINY_CLIP))
    cfg["text_cfg"].update(text_cfg)
    path.write_text(json.dumps(cfg))
    return path


def colour_folder(root: Path, n: int = 24, size: int = 8, seed: int = 0, captions: bool = True) -> Path:
    """n noisy solid-colour images, captioned by their dominant channel ("red", "green", "blue")."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    meta = []
    for i in range(n):
        name = list(COLOURS)[i % 3]
        rgb = rng.uniform(0.0, 0.3, size=3)
        rgb[COLOURS[name]] = rng.uniform(0.6, 1.0)
        pixels = np.clip(rgb + rng.normal(0, 0.05, size=(size, size, 3)), 0, 1)
        Image.fromarray((pixels * 255).astype(np.uint8)).save(root / f"{i:03d}.png")
        meta.append({"file_name": f"{i:03d}.png", "text": name})
    if captions:
        (root / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    return root


def colour_hits(run, per_colour: int = 6, steps: int = 12, guidance: float = 2.0) -> int:
    """How many of `per_colour` samples per caption ("red", "green", "blue") of a run trained on a colour_folder
    land nearest the mean latent of that caption's images (chance: a third). Euler with the run's own noise
    levels (a flow base's schedule, else EDM's sigma_min..sigma_max) and its coordinate scale."""
    import torch

    from latentpatch.conditioning.requested import request_conditioning
    from latentpatch.data.store import LatentStore
    from latentpatch.denoiser import sampling_sigmas
    from latentpatch.runs import load_run
    from latentpatch.sampling.latents import generate_latents

    loaded = load_run(run)
    store = LatentStore(run.latents)
    latents, captions = store.load()["mean"].float(), store.captions
    names = list(COLOURS)
    means = torch.stack([latents[[i for i, c in enumerate(captions) if c == k]].mean(0) for k in names])
    prompts = [k for k in names for _ in range(per_colour)]
    cond, uncond = request_conditioning(loaded.spec, loaded.text_encoder(), prompts)
    shape, cfg = tuple(loaded.info["latent_shape"]), loaded.cfg
    x = generate_latents(loaded.precond, list(range(len(names) * per_colour)), shape, cond, uncond, sampler="euler",
                         guidance=guidance, steps=steps, sigma_min=cfg.edm.sigma_min, sigma_max=cfg.edm.sigma_max,
                         coordinate_scale=cfg.patches.coordinate_scale, sigmas=sampling_sigmas(cfg, steps, shape[1:]))
    nearest = ((x[:, None] - means[None]) ** 2).mean((2, 3, 4)).argmin(1)
    return int((nearest == torch.arange(len(names)).repeat_interleave(per_colour)).sum())
