"""Drawing one training batch from the in-memory latent store.

Every random choice of a step (which images, the latent drawn from the posterior, label dropout, crop
positions, sigma, noise) comes from generators seeded by (seed, step, micro-step) alone, and is drawn
for the whole global batch on every rank before each rank takes its slice. So a resumed run repeats the
same batches exactly, and 2 processes compute the same global batch as 1 process.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch
from torch import Tensor

from latentpatch.config import RunConfig
from latentpatch.diffusion.edm import training_sigmas
from latentpatch.errors import UserError
from latentpatch.models.conditioning import Conditioning
from latentpatch.patches import PatchStage, random_crops

COORDINATE_MODES = ("absolute", "local")


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed from (seed, step, ...) that is the same in every process and Python run."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def make_generator(device: torch.device | str, *parts: int | str) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(derive_seed(*parts))


@dataclass
class Batch:
    """This rank's slice of one micro-batch: clean crops, their coordinates, noise level and noise."""

    x0: Tensor  # [b, C, ph, pw]
    coords: Tensor  # [b, 2, ph, pw]
    sigma: Tensor  # [b]
    noise: Tensor  # [b, C, ph, pw]
    cond: Conditioning | None


def make_conditioning(
    store_tensors: dict[str, Tensor], indices: Tensor, generator: torch.Generator, cfg: RunConfig
) -> Conditioning | None:
    """Conditioning of the global batch `indices`, with label dropout (the null label is num_classes) and
    caption dropout (the caption becomes the empty one, `null_text_*`), drawn from `generator` in that order.
    """
    num_classes = cfg.model.num_classes
    if num_classes <= 0 and cfg.model.text_dim <= 0 and cfg.model.pooled_text_dim <= 0:
        return None
    cond = Conditioning()
    device = generator.device
    if num_classes > 0:
        labels = store_tensors["labels"][indices].to(device)
        drop = torch.rand(labels.shape, generator=generator, device=device) < cfg.train.label_dropout
        cond.class_labels = torch.where(drop, torch.full_like(labels, num_classes), labels)
    keys = ("text_tokens", "text_mask") + (("text_pooled",) if cfg.model.pooled_text_dim > 0 else ())
    drop = None
    if "null_text_tokens" in store_tensors and (cfg.model.text_dim > 0 or cfg.model.pooled_text_dim > 0):
        drop = torch.rand(indices.shape, generator=generator, device=device) < cfg.text.caption_dropout
    for key in keys:
        if key in store_tensors:
            value = store_tensors[key][indices].to(device)
            if drop is not None:  # Ho & Salimans 2022: the dropped rows train the unconditional model
                null = store_tensors["null_" + key].to(device)
                value = torch.where(drop.view(-1, *[1] * (value.dim() - 1)), null, value)
            setattr(cond, key, value)
    return cond


def _slice_cond(cond: Conditioning | None, sl: slice) -> Conditioning | None:
    if cond is None:
        return None
    return Conditioning(**{k: (None if v is None else v[sl]) for k, v in vars(cond).items()})


def draw_batch(
    store_tensors: dict[str, Tensor], cfg: RunConfig, stage: PatchStage, global_batch: int, step: int,
    micro: int, rank: int, world: int, device: torch.device,
) -> Batch:
    """Draw micro-batch `micro` of optimisation step `step` for all ranks, return rank `rank`'s share."""
    if cfg.patches.coordinates not in COORDINATE_MODES:
        raise UserError(f"patches.coordinates must be one of {COORDINATE_MODES}, got {cfg.patches.coordinates!r}")
    seed = cfg.train.seed
    mean = store_tensors["mean"]
    # Indices with replacement, on the store's device (the CPU); everything else on the training device.
    g_idx = make_generator(mean.device, seed, step, micro, "indices")
    indices = torch.randint(0, mean.shape[0], (global_batch,), generator=g_idx, device=mean.device)
    g = make_generator(device, seed, step, micro, "batch")
    x = mean[indices].to(device, torch.float32)
    if "std" in store_tensors:  # a fresh latent from the encoder's posterior N(mean, std^2)
        std = store_tensors["std"][indices].to(device, torch.float32)
        x = x + std * torch.randn(x.shape, generator=g, device=device)
    cond = make_conditioning(store_tensors, indices, g, cfg)
    crops, coords = random_crops(
        x, stage.height, stage.width, g, local_coordinates=cfg.patches.coordinates == "local"
    )
    sigma = training_sigmas(global_batch, cfg.edm, g, device)
    noise = torch.randn(crops.shape, generator=g, device=device)
    per_rank = global_batch // world
    sl = slice(rank * per_rank, (rank + 1) * per_rank)
    return Batch(crops[sl], coords[sl], sigma[sl], noise[sl], _slice_cond(cond, sl))
