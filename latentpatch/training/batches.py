"""The training data: the latent store in memory, and one training batch drawn from it.

Every random choice of a step (which images, the latent drawn from the posterior, label and caption
dropout, crop positions, sigma, noise) comes from generators seeded by (seed, step, micro-step) alone, and
is drawn for the whole micro-batch of all ranks on every rank before each rank takes its slice. So a
resumed run repeats the same batches exactly, and 2 processes compute the same batch as 1 process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from latentpatch.conditioning import Conditioning, ConditioningSpec, TextSource
from latentpatch.conditioning.stored import condition_rows, draw_rows
from latentpatch.data.store import LatentStore
from latentpatch.diffusion.edm import EDMConfig, training_sigmas
from latentpatch.errors import UserError
from latentpatch.patches import PatchStage, random_crops
from latentpatch.seeding import make_generator

if TYPE_CHECKING:
    from latentpatch.config import RunConfig


@dataclass(frozen=True)
class BatchSpec:
    """What a batch draw needs from the run, resolved once at the start (not the whole RunConfig)."""

    seed: int
    edm: EDMConfig
    conditioning: ConditioningSpec
    label_dropout: float
    caption_dropout: float
    local_coordinates: bool  # the ablation without location information

    @classmethod
    def from_config(cls, cfg: RunConfig, conditioning: ConditioningSpec) -> BatchSpec:
        return cls(cfg.train.seed, cfg.edm, conditioning, cfg.train.label_dropout, cfg.text.caption_dropout,
                   local_coordinates=cfg.patches.coordinates == "local")


@dataclass
class Batch:
    """This rank's slice of one micro-batch: clean crops, their coordinates, noise level and noise."""

    x0: Tensor  # [b, C, ph, pw]
    coords: Tensor  # [b, 2, ph, pw]
    sigma: Tensor  # [b]
    noise: Tensor  # [b, C, ph, pw]
    cond: Conditioning | None


def draw_batch(
    store_tensors: dict[str, Tensor], spec: BatchSpec, stage: PatchStage, micro_batch: int, step: int,
    micro: int, rank: int, world: int, device: torch.device,
) -> Batch:
    """Draw micro-batch `micro` of optimisation step `step` (`micro_batch` samples over all ranks) and return
    rank `rank`'s share."""
    mean = store_tensors["mean"]
    # Indices with replacement, on the store's device (the CPU); everything else on the training device.
    g_idx = make_generator(mean.device, spec.seed, step, micro, "indices")
    indices = torch.randint(0, mean.shape[0], (micro_batch,), generator=g_idx, device=mean.device)
    g = make_generator(device, spec.seed, step, micro, "batch")
    x = mean[indices].to(device, torch.float32)
    if "std" in store_tensors:  # a fresh latent from the encoder's posterior N(mean, std^2)
        std = store_tensors["std"][indices].to(device, torch.float32)
        x = x + std * torch.randn(x.shape, generator=g, device=device)
    cond = draw_rows(spec.conditioning, store_tensors, indices, g, spec.label_dropout, spec.caption_dropout)
    crops, coords = random_crops(x, stage.height, stage.width, g, local_coordinates=spec.local_coordinates)
    sigma = training_sigmas(micro_batch, spec.edm, g, device)
    noise = torch.randn(crops.shape, generator=g, device=device)
    per_rank = micro_batch // world
    sl = slice(rank * per_rank, (rank + 1) * per_rank)
    return Batch(crops[sl], coords[sl], sigma[sl], noise[sl], None if cond is None else cond.select(sl))


def load_training_tensors(store: LatentStore, spec: ConditioningSpec, text: TextSource | None) -> dict[str, Tensor]:
    """All rows of the store in memory (mean, std) plus the conditioning rows the spec needs (labels, text
    embeddings from the store's cache or embedded once here, the empty caption's null_*)."""
    if len(store) == 0:
        raise UserError(f"latent store {store.path} is empty; encode some images first")
    tensors = store.load()
    tensors.update(condition_rows(spec, store, tensors, text))
    return tensors
