"""A tiny real run folder (config, run.json, one checkpoint) for sampling tests, written with the trainer's
own checkpoint writer and the "pixel" autoencoder, so decoding is the identity.

The `tiny_run` and `tiny_class_run` fixtures (tests/conftest.py) make one in a test's tmp_path.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

import latentpatch
from latentpatch.autoencoders import PixelAutoencoder
from latentpatch.checkpoints import save_checkpoint
from latentpatch.conditioning import ConditioningSpec
from latentpatch.config import load_config, save_config
from latentpatch.denoiser import build_precond


def make_tiny_run(
    root: Path, *, num_classes: int = 0, side: int = 8, step: int = 1, checkpoint: bool = True,
) -> Path:
    """A 2-block DiT (hidden 32) on 3 x side x side pixel "latents", randomly initialised.

    The zero-initialised layers get small random weights too, so the network's output is not trivially 0;
    the EMA weights differ from the raw ones.
    """
    root.mkdir(parents=True, exist_ok=True)
    cfg = load_config(None, [
        "model.dit.hidden_size=32", "model.dit.depth=2", "model.dit.num_heads=2", "model.dit.patch_size=2",
        f"model.num_classes={num_classes}", "model.attention=sdpa", "edm.sigma_data=0.5",
    ])
    save_config(cfg, root / "config.yaml")
    info = {
        "format_version": 1,
        "latents": str(root / "latents"),
        "autoencoder": PixelAutoencoder().info.to_dict(),
        "latent_shape": [3, side, side],
        "resolution": [side, side],
        "conditioning": ConditioningSpec(num_classes, tuple(f"class{k}" for k in range(num_classes)) or None).to_dict(),
        "created": "2025-01-01T00:00:00",
        "latentpatch_version": latentpatch.__version__,
    }
    (root / "run.json").write_text(json.dumps(info, indent=1))
    if checkpoint:
        gen = torch.Generator().manual_seed(1234)
        model = build_precond(cfg, 3, device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
        ema = copy.deepcopy(model)
        with torch.no_grad():
            for p in ema.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=gen))
        optimizer = torch.optim.AdamW(model.parameters())
        save_checkpoint(root, step, model, ema, optimizer, {"nimg": 0})
    return root
