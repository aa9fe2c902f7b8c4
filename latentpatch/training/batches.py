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
from latentpatch.models.routing import TokenRoute, kept_tokens
from latentpatch.patches import PatchStage, random_crops
from latentpatch.seeding import make_generator

if TYPE_CHECKING:
    from latentpatch.config import RunConfig
    from latentpatch.training.train_config import RoutingConfig


@dataclass(frozen=True)
class BatchSpec:
    """What a batch draw needs from the run, resolved once at the start (not the whole RunConfig)."""

    seed: int
    edm: EDMConfig
    conditioning: ConditioningSpec
    label_dropout: float
    caption_dropout: float
    local_coordinates: bool  # the ablation without location information
    crop_multiple: int = 1  # crop offsets are multiples of this (the network's token size when aligned)
    token_size: int = 1  # latent pixels per token side (the DiT patch size), for token routing
    routing: RoutingConfig | None = None  # TREAD routing (None or share 0: every token in every block)
    route_blocks: tuple[int, int] = (0, 0)

    @classmethod
    def from_config(cls, cfg: RunConfig, conditioning: ConditioningSpec, size_multiple: int = 1) -> BatchSpec:
        """`size_multiple`: the network's token size (DiT patch size) or total downsampling (UNet)."""
        routing = cfg.routing if cfg.routing.share > 0 else None
        return cls(cfg.train.seed, cfg.edm, conditioning, cfg.train.label_dropout, cfg.text.caption_dropout,
                   local_coordinates=cfg.patches.coordinates == "local",
                   crop_multiple=size_multiple if cfg.patches.aligned else 1, token_size=size_multiple,
                   routing=routing, route_blocks=routing.blocks(cfg.model.dit.depth) if routing else (0, 0))


@dataclass
class Batch:
    """This rank's slice of one micro-batch: clean crops, their coordinates, noise level and noise."""

    x0: Tensor  # [b, C, ph, pw]
    coords: Tensor  # [b, 2, ph, pw]
    sigma: Tensor  # [b]
    noise: Tensor  # [b, C, ph, pw]
    cond: Conditioning | None
    route: TokenRoute | None = None  # the tokens that go through the routed blocks (training with routing)

    def net_kwargs(self) -> dict:
        return {} if self.route is None else {"route": self.route}


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
    crops, coords = random_crops(x, stage.height, stage.width, g, local_coordinates=spec.local_coordinates,
                                 multiple=spec.crop_multiple)
    sigma = training_sigmas(micro_batch, spec.edm, g, device)
    noise = torch.randn(crops.shape, generator=g, device=device)
    route = None
    if spec.routing is not None and spec.routing.active(step):  # drawn last: the other draws stay the same
        tokens = (stage.height // spec.token_size) * (stage.width // spec.token_size)
        route = TokenRoute(kept_tokens(micro_batch, tokens, spec.routing.share, g), *spec.route_blocks)
    per_rank = micro_batch // world
    sl = slice(rank * per_rank, (rank + 1) * per_rank)
    return Batch(crops[sl], coords[sl], sigma[sl], noise[sl], None if cond is None else cond.select(sl),
                 None if route is None else route.select(sl))


def load_training_tensors(store: LatentStore, spec: ConditioningSpec, text: TextSource | None) -> dict[str, Tensor]:
    """All rows of the store in memory (mean, std) plus the conditioning rows the spec needs (labels, text
    embeddings from the store's cache or embedded once here, the empty caption's null_*)."""
    if len(store) == 0:
        raise UserError(f"latent store {store.path} is empty; encode some images first")
    tensors = store.load()
    tensors.update(condition_rows(spec, store, tensors, text))
    return tensors


def training_rows(tensors: dict[str, Tensor], held: Tensor | None) -> dict[str, Tensor]:
    """The store's tensors without the held-out rows `held` (per-row tensors lose them; null_* stay)."""
    if held is None:
        return tensors
    n = tensors["mean"].shape[0]
    keep = torch.ones(n, dtype=torch.bool)
    keep[held] = False
    return {k: v if k.startswith("null_") or v.shape[0] != n else v[keep] for k, v in tensors.items()}
