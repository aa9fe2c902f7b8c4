"""The training data: the latent store's rows (memory-mapped, or on the training device when they fit), and
one training batch drawn from them.

Every random choice of a step (which images, the latent drawn from the posterior, label and caption dropout,
crop positions, sigma, noise, routed tokens) comes from generators seeded by (seed, step, micro-step) alone and
is drawn for the whole micro-batch of all ranks on every rank; each rank then reads only its own slice of the
rows. So a resumed run repeats the same batches exactly, and 2 processes compute the same batch as 1 process.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from latentpatch.conditioning import Conditioning, ConditioningSpec, TextSource
from latentpatch.conditioning.stored import condition_rows, draw_rows
from latentpatch.data.rows import ShardedRows
from latentpatch.data.store import LatentStore
from latentpatch.diffusion.edm import EDMConfig, training_sigmas
from latentpatch.models.routing import TokenRoute, kept_tokens
from latentpatch.patches import PatchStage, crop_offsets, gather_crops
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
    coordinate_scale: str = "per-axis"  # patches.coordinate_scale: how a non-square latent's grid is normalised
    zoom_scale: float = 1.0  # zoomed-out latents x this have the training latents' std (training.zoom.zoom_scale)

    @classmethod
    def from_config(cls, cfg: RunConfig, conditioning: ConditioningSpec, size_multiple: int = 1,
                    zoom_scale: float = 1.0) -> BatchSpec:
        """`size_multiple`: the network's token size (DiT patch size) or total downsampling (UNet)."""
        routing = cfg.routing if cfg.routing.share > 0 else None
        return cls(cfg.train.seed, cfg.edm, conditioning, cfg.train.label_dropout, cfg.text.caption_dropout,
                   local_coordinates=cfg.patches.coordinates == "local",
                   crop_multiple=size_multiple if cfg.patches.aligned else 1, token_size=size_multiple,
                   routing=routing, route_blocks=routing.blocks(cfg.model.dit.depth) if routing else (0, 0),
                   coordinate_scale=cfg.patches.coordinate_scale, zoom_scale=zoom_scale)


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
    rows: dict[str, Tensor | ShardedRows], spec: BatchSpec, stage: PatchStage, micro_batch: int, step: int,
    micro: int, rank: int, world: int, device: torch.device,
) -> Batch:
    """Draw micro-batch `micro` of optimisation step `step` (`micro_batch` samples over all ranks) and return
    rank `rank`'s share, reading only that share's rows. A zoom stage is a full-size step of the rows' zoomed-out
    latents (training.zoom), drawn in the same order and scaled by spec.zoom_scale."""
    key = "zoom_" if stage.zoom else ""
    mean = rows[key + "mean"]
    g_idx = make_generator("cpu", spec.seed, step, micro, "indices")  # on the CPU wherever the rows are
    indices = torch.randint(0, mean.shape[0], (micro_batch,), generator=g_idx)
    per_rank = micro_batch // world
    sl = slice(rank * per_rank, (rank + 1) * per_rank)
    own = indices[sl].to(mean.device)  # this rank's rows, indexed where the rows are
    g = make_generator(device, spec.seed, step, micro, "batch")
    x = to_device(mean[own], device).float()
    c, h, w = mean.shape[1:]
    if key + "std" in rows:  # a fresh latent from the encoder's posterior N(mean, std^2)
        eps = torch.randn((micro_batch, c, h, w), generator=g, device=device)[sl]
        x = x + to_device(rows[key + "std"][own], device).float() * eps
    if stage.zoom:
        x = x * spec.zoom_scale
    cond = draw_rows(spec.conditioning, rows, indices, g, spec.label_dropout, spec.caption_dropout, own=sl)
    tops, lefts = crop_offsets(micro_batch, h, w, stage.height, stage.width, g, spec.crop_multiple)
    crops, coords = gather_crops(x, tops[sl], lefts[sl], stage.height, stage.width, spec.local_coordinates,
                                 spec.coordinate_scale)
    sigma, noise, route = draw_noise(spec, stage, c, micro_batch, step, g, device, sl)
    return Batch(crops, coords, sigma, noise, cond, route)


def draw_noise(spec: BatchSpec, stage: PatchStage, channels: int, micro_batch: int, step: int,
               g: torch.Generator, device: torch.device, sl: slice) -> tuple[Tensor, Tensor, TokenRoute | None]:
    """The last draws of a batch, after its rows and crops: noise levels, noise, routed tokens (this rank's)."""
    sigma = training_sigmas(micro_batch, spec.edm, g, device, quantiles=stage.sigma_slice,
                            overlap=stage.sigma_overlap)[sl]
    noise = torch.randn((micro_batch, channels, stage.height, stage.width), generator=g, device=device)[sl]
    route = None
    if spec.routing is not None and spec.routing.active(step):  # drawn last: the other draws stay the same
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


def load_training_tensors(store: LatentStore, spec: ConditioningSpec, text: TextSource | None) -> dict:
    """The store's latent rows, memory-mapped (posterior mean, std), and the conditioning rows the spec needs
    (labels; text embeddings from the store's cache or embedded once here; the empty caption's null_*). A
    bucketed store's latents differ in shape and are read per bucket (training.bucketed): only conditioning here."""
    from latentpatch.conditioning.stored import TEXT_FIELDS
    from latentpatch.text.cache import HASH_KEY

    rows: dict = store.rows() if store.buckets is None else {}  # a bucketed store's latents: BucketedRows
    cached = store.load(names=(*TEXT_FIELDS, HASH_KEY)) if spec.text and text is not None and text.cached else {}
    rows.update(condition_rows(spec, store, cached, text))
    return rows


def training_rows(rows: dict, held: Tensor | None) -> dict:
    """The rows without the held-out ones `held` (per-row tensors, zoom_* too, lose them; null_* stay)."""
    if held is None:
        return rows
    n = rows["mean"].shape[0]
    keep = torch.ones(n, dtype=torch.bool)
    keep[held] = False
    return {k: v if k.startswith("null_") or v.shape[0] != n else subset_rows(v, keep) for k, v in rows.items()}


def subset_rows(v: Tensor | ShardedRows, keep: Tensor) -> Tensor | ShardedRows:
    """Rows `keep` (a mask or indices) of a tensor or of memory-mapped rows (without copying a shard)."""
    return v.subset(keep) if isinstance(v, ShardedRows) else v[keep]


def place_rows(rows: dict, device: torch.device, share: float) -> dict:
    """All rows on the training device when they fit in `share` of its free memory (CUDA), else on the host,
    where each draw copies its rows over; the CPU reads them where they lie."""
    if device.type != "cuda":
        return rows
    free, _ = torch.cuda.mem_get_info(device)
    size = sum(rows_nbytes(v) for v in rows.values())
    if size > share * free:
        return rows
    return {k: (v.materialize() if isinstance(v, ShardedRows) else v).to(device) for k, v in rows.items()}


def rows_nbytes(v: Tensor | ShardedRows) -> int:
    return v.nbytes if isinstance(v, ShardedRows) else v.numel() * v.element_size()
