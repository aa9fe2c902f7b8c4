"""Random latents for step timings: a latent store written by the project's store writer, and the fixed
tensors of a plain training loop (a step's cost does not depend on the values)."""

from __future__ import annotations

from pathlib import Path

import torch

from latentpatch.patches import random_crops

C = 4  # latent channels


def make_store(root: Path, side: int, n: int = 64) -> Path:
    """A latent store of n random 4-channel latents (the step's cost does not depend on their values)."""
    from latentpatch.autoencoders import AutoencoderInfo
    from latentpatch.data.manifest import Item, Manifest
    from latentpatch.data.store import StoreWriter

    info = AutoencoderInfo("kl", "synthetic", None, C, 8, 1.0, 0.0)
    manifest = Manifest(autoencoder=info.to_dict(), resolution=[side * 8] * 2, latent_shape=[C, side, side],
                        dtype="float16", stores_std=True)
    writer = StoreWriter(root, manifest, shard_size=n, background=False)
    items = [Item(file=f"{i}.png", sha256=f"{i:064x}", caption=None, flip=False, shard=0, row=0) for i in range(n)]
    writer.add({"mean": torch.randn(n, C, side, side).half(), "std": torch.full((n, C, side, side), 0.1).half()},
               items)
    writer.close()
    return root


def plain_inputs(side: int, batch: int, full: int, device: torch.device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, C, full, full, generator=g)
    x0, coords = random_crops(latents, side, side, g, multiple=2)
    sigma = (torch.randn(batch, generator=g) * 1.2 - 1.2).exp()
    return [t.to(device) for t in (x0, coords, sigma, torch.randn(x0.shape, generator=g))]
