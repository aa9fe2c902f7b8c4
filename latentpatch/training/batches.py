"""One training batch, drawn from a run's TrainingRows (training.rows), whatever the store's shapes.

Every random choice of a step (which images, the latent drawn from the posterior, label and caption dropout,
crop positions, noise level, noise, routed tokens) comes from generators seeded by (seed, step, micro-step) alone
and is drawn for the whole micro-batch of all ranks on every rank; each rank then reads only its own slice of the
rows. So a resumed run repeats the same batches exactly, and 2 processes compute the same batch as 1 process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from latentpatch.conditioning import Conditioning, ConditioningSpec, TextSource
from latentpatch.conditioning.stored import condition_rows, draw_rows
from latentpatch.data.store import LatentStore
from latentpatch.models.routing import TokenRoute, kept_tokens
from latentpatch.patches import PatchStage, crop_offsets_within, gather_crops
from latentpatch.seeding import make_generator
from latentpatch.training.rows import LATENTS, Bucket, TrainingRows

if TYPE_CHECKING:
    from latentpatch.config import RunConfig
    from latentpatch.train_config import RoutingConfig


@dataclass(frozen=True)
class BatchSpec:
    """What a batch draw needs from the run, resolved once at the start (not the whole RunConfig)."""

    seed: int
    objective: Any  # draws the noise levels: draw_sigmas(n, generator, device, full_shapes) (latentpatch.denoiser)
    conditioning: ConditioningSpec
    label_dropout: float
    caption_dropout: float
    crop_multiple: int = 1  # crop offsets are multiples of this (the network's token size when aligned)
    token_size: int = 1  # latent pixels per token side (the DiT patch size), for token routing
    routing: RoutingConfig | None = None  # TREAD routing (None: every token in every block)
    route_blocks: tuple[int, int] = (0, 0)
    coordinate_scale: str = "longer-side"  # patches.coordinate_scale: how a non-square latent's grid is normalised

    @classmethod
    def from_config(cls, cfg: RunConfig, conditioning: ConditioningSpec, size_multiple: int = 1,
                    objective: Any = None) -> BatchSpec:
        """`size_multiple`: the network's token size (DiT patch size) or total downsampling (UNet); `objective`:
        the run's (None: the one denoiser.build_objective builds for `cfg`)."""
        from latentpatch.denoiser import build_objective

        objective = build_objective(cfg) if objective is None else objective
        routing = cfg.routing if cfg.routing.share > 0 else None
        return cls(cfg.train.seed, objective, conditioning, cfg.train.label_dropout, cfg.text.caption_dropout,
                   crop_multiple=size_multiple if cfg.patches.aligned else 1, token_size=size_multiple,
                   routing=routing, route_blocks=routing.blocks(cfg.model.dit.depth) if routing else (0, 0),
                   coordinate_scale=cfg.patches.coordinate_scale)


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
    rows: TrainingRows, spec: BatchSpec, stage: PatchStage, micro_batch: int, step: int, micro: int, rank: int,
    world: int, device: torch.device,
) -> Batch:
    """Draw micro-batch `micro` of optimisation step `step` (`micro_batch` samples over all ranks) and return rank
    `rank`'s share, reading only that share's rows: a full-size stage takes one bucket whole, a zoom stage the
    zoomed-out latents, a patch stage crops of every bucket's rows."""
    if stage.zoom:
        parts, members, bucket_of, local = [rows.zoom], torch.arange(len(rows)), torch.zeros_like(rows.bucket_of), None
    elif (stage.height, stage.width) == rows.nominal:
        b = rows.full_size_bucket(spec.seed, step, micro)
        parts, members, bucket_of, local = rows.buckets, rows.buckets[b].members, rows.bucket_of, rows.local
        _, ph, pw = rows.buckets[b].shape
        stage = PatchStage(ph, pw, stage.prob, stage.batch_size)
    else:
        parts, members, bucket_of, local = rows.buckets, torch.arange(len(rows)), rows.bucket_of, rows.local
    g_idx = make_generator("cpu", spec.seed, step, micro, "indices")  # on the CPU wherever the rows are
    drawn = members[torch.randint(0, len(members), (micro_batch,), generator=g_idx)]  # training rows, all ranks
    per_rank = micro_batch // world
    sl = slice(rank * per_rank, (rank + 1) * per_rank)
    g = make_generator(device, spec.seed, step, micro, "batch")
    sides = torch.tensor([p.shape[1:] for p in parts])[bucket_of[drawn]]  # [micro_batch, 2]: each row's (h, w)
    c = parts[0].shape[0]
    eps = None
    if "std" in parts[0].latents:  # a fresh latent from the encoder's posterior N(mean, std^2), drawn full size
        h_max, w_max = (int(s) for s in sides.max(0).values)
        eps = torch.randn((micro_batch, c, h_max, w_max), generator=g, device=device)[sl]
    cond = draw_rows(spec.conditioning, rows.cond, drawn, g, spec.label_dropout, spec.caption_dropout, own=sl)
    tops, lefts = crop_offsets_within(sides[:, 0], sides[:, 1], stage.height, stage.width, g, spec.crop_multiple)
    own = drawn[sl]
    x0, coords = _crops(parts, bucket_of[own], own if local is None else local[own], tops[sl], lefts[sl],
                        stage.height, stage.width, eps, spec.coordinate_scale, device)
    sigma, noise, route = draw_noise(spec, stage, c, micro_batch, g, device, sl, sides)
    return Batch(x0, coords, sigma, noise, cond, route)


def _crops(parts: list[Bucket], buckets: Tensor, local: Tensor, tops: Tensor, lefts: Tensor, ph: int, pw: int,
           eps: Tensor | None, scale: str, device: torch.device) -> tuple[Tensor, Tensor]:
    """This rank's crops, gathered bucket by bucket from each row's own latent (mean + std * eps at full size, then
    cut), and their coordinates on each row's own grid."""
    c = parts[0].shape[0]
    x0 = torch.empty((len(local), c, ph, pw), device=device)
    coords = torch.empty((len(local), 2, ph, pw), device=device)
    for b in buckets.unique().tolist():
        at = (buckets == b).nonzero().flatten()
        part, at_dev = parts[b], at.to(device)
        rows = local[at]
        _, h, w = part.shape
        latents = [to_device(part.latents[k][rows.to(part.latents[k].device)], device).float()
                   for k in LATENTS if k in part.latents]
        if eps is not None:
            latents.append(eps[at_dev, :, :h, :w])
        cut, grid = gather_crops(torch.cat(latents, 1), tops[at_dev], lefts[at_dev], ph, pw, scale)
        x = cut[:, :c] if eps is None else cut[:, :c] + cut[:, c:2 * c] * cut[:, 2 * c:]
        x0[at_dev] = x * part.scale if part.scale != 1.0 else x
        coords[at_dev] = grid
    return x0, coords


def draw_noise(spec: BatchSpec, stage: PatchStage, channels: int, micro_batch: int, g: torch.Generator,
               device: torch.device, sl: slice, sides: Tensor) -> tuple[Tensor, Tensor, TokenRoute | None]:
    """The last draws of a batch, after its rows and crops: noise levels (from each row's full latent `sides`,
    which some objectives' shifts read), noise, routed tokens; this rank's."""
    sigma = spec.objective.draw_sigmas(micro_batch, g, device, sides)[sl]
    noise = torch.randn((micro_batch, channels, stage.height, stage.width), generator=g, device=device)[sl]
    route = None
    if spec.routing is not None:  # drawn last: the other draws stay the same
        tokens = (stage.height // spec.token_size) * (stage.width // spec.token_size)
        route = TokenRoute(kept_tokens(micro_batch, tokens, spec.routing.share, g)[sl], *spec.route_blocks)
    return sigma, noise, route


def to_device(t: Tensor, device: torch.device) -> Tensor:
    """Host rows to the training device: through pinned memory, asynchronously, on CUDA."""
    if t.device == device:
        return t
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def conditioning_rows(store: LatentStore, spec: ConditioningSpec, text: TextSource | None) -> dict[str, Tensor]:
    """The conditioning rows of every store item the spec needs (labels; text embeddings from the store's cache or
    embedded once here; the empty caption's null_*), in manifest order."""
    from latentpatch.conditioning.stored import TEXT_FIELDS
    from latentpatch.text.cache import HASH_KEY

    cached = store.load(names=(*TEXT_FIELDS, HASH_KEY)) if spec.text and text is not None and text.cached else {}
    return condition_rows(spec, store, cached, text)
