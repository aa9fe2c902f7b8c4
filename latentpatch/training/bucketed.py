"""Training on a store with aspect buckets (issue 23): latents of several shapes, drawn so that each batch has one.

A full-size step takes one bucket (probability proportional to its training rows) and draws its rows from that
bucket alone, at that bucket's shape. A patch step draws rows from every bucket and cuts an equal square crop from
each row's own latent, at an offset within that row's own bounds, with the coordinates of its place on its own
image's grid: Patch Diffusion's coordinate channels are what let one equal-shaped batch mix aspect ratios.
The determinism rules are draw_batch's: every draw comes from generators seeded by (seed, step, micro-step) and
covers the whole micro-batch on every rank, so resume and 1-vs-N-process equality hold here too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING, Callable

import torch
from torch import Tensor

from latentpatch.conditioning.stored import draw_rows
from latentpatch.data.rows import ShardedRows
from latentpatch.errors import UserError
from latentpatch.patches import PatchSchedule, PatchStage, crop_offsets_within, gather_crops
from latentpatch.seeding import make_generator
from latentpatch.training.batches import (Batch, BatchSpec, draw_batch, draw_noise, place_rows, rows_nbytes,
                                          subset_rows, to_device, training_rows)

if TYPE_CHECKING:
    from latentpatch.config import RunConfig
    from latentpatch.data.store import LatentStore

MIN_BUCKET_IMAGES = 2  # a full-size step of a bucket with one image would be a batch of that image alone
LATENTS = ("mean", "std")


@dataclass
class BucketedRows:
    """A bucketed store's training rows: the store's rows less the held-out ones, in manifest order.

    Training row t is row local[t] of bucket bucket_of[t]; `buckets[b]` holds that bucket's training rows (its
    latents and their conditioning, with null_*), so a full-size step of it is an ordinary draw_batch; `cond`
    holds the conditioning of all training rows in training order, for patch steps that mix buckets.
    """

    buckets: list[dict[str, Tensor | ShardedRows]]
    shapes: list[tuple[int, int, int]]  # (C, h, w) of each bucket
    bucket_of: Tensor  # [n] long, on the CPU
    local: Tensor  # [n] long, on the CPU
    cond: dict[str, Tensor]
    nominal: tuple[int, int]  # the square latent of the buckets' area: the schedule's full size

    @classmethod
    def split(cls, per_bucket: list[dict[str, Tensor | ShardedRows]], bucket_of: Tensor, cond: dict[str, Tensor],
              held: Tensor | None, nominal: tuple[int, int]) -> BucketedRows:
        """From each bucket's latent rows (`per_bucket[b]`: its items in manifest order), each item's bucket
        `bucket_of` [N], the items' conditioning rows `cond` (per item, and null_*) and the held-out items `held`."""
        n = len(bucket_of)
        keep = torch.ones(n, dtype=torch.bool)
        if held is not None:
            keep[held] = False
        buckets = []
        for b, latents in enumerate(per_bucket):
            members = (bucket_of == b).nonzero().flatten()
            kept = keep[members]
            part = {k: subset_rows(v, kept) for k, v in latents.items() if k in LATENTS}
            part.update(_rows_of(cond, members[kept]))
            buckets.append(part)
        trained = keep.nonzero().flatten()
        shapes = [tuple(int(s) for s in d["mean"].shape[1:]) for d in per_bucket]
        return cls(buckets, shapes, bucket_of[trained].clone(), rank_within(bucket_of[trained]),
                   _rows_of(cond, trained), nominal)

    @classmethod
    def from_store(cls, store: LatentStore, cond: dict[str, Tensor], held: Tensor | None) -> BucketedRows:
        """The store's latents (memory-mapped, per bucket) and conditioning rows `cond`, less the rows `held`."""
        _, h, w = store.latent_shape
        return cls.split(store.bucket_rows(), store.bucket_of, cond, held, (h, w))

    def __len__(self) -> int:
        return len(self.bucket_of)

    @cached_property
    def counts(self) -> Tensor:
        """Training rows per bucket (counted once: every full-size step's bucket draw reads it)."""
        return torch.bincount(self.bucket_of, minlength=len(self.shapes))

    def place(self, device: torch.device, share: float) -> BucketedRows:
        """All rows on the training device when together they fit in `share` of its free memory (place_rows)."""
        if device.type != "cuda":
            return self
        free, _ = torch.cuda.mem_get_info(device)
        size = sum(rows_nbytes(v) for d in (*self.buckets, self.cond) for v in d.values())
        if size > share * free:
            return self
        return replace(self, buckets=[place_rows(d, device, math.inf) for d in self.buckets],
                       cond=place_rows(self.cond, device, math.inf))

    def is_full_size(self, stage: PatchStage) -> bool:
        return (stage.height, stage.width) == self.nominal

    def full_size_bucket(self, seed: int, step: int, micro: int) -> int:
        """The bucket a full-size micro-step trains on: drawn in proportion to the buckets' training rows."""
        g = make_generator("cpu", seed, step, micro, "bucket")
        return int(torch.multinomial(self.counts.double(), 1, generator=g))

    def step_shape(self, stage: PatchStage, seed: int, step: int) -> tuple[PatchStage, int]:
        """The stage as step `step` trains it (a full-size stage at its first micro-step's bucket shape) and the
        full-size area its crops are a share of (for counted images and the "area" loss weighting)."""
        if not self.is_full_size(stage):
            return stage, self.nominal[0] * self.nominal[1]
        _, h, w = self.shapes[self.full_size_bucket(seed, step, 0)]
        return replace(stage, height=h, width=w), h * w


def training_data(store: LatentStore, tensors: dict, held: Tensor | None, device: torch.device,
                  share: float) -> tuple[dict | BucketedRows, Callable[..., Batch]]:
    """The training rows (less the held-out `held`) where they are trained from, and the function that draws a
    batch of them: the one choice between a single-shape store (draw_batch, as always) and one with buckets."""
    if store.buckets is None:
        return place_rows(training_rows(tensors, held), device, share), draw_batch
    return BucketedRows.from_store(store, tensors, held).place(device, share), draw_bucketed_batch


def step_shape(rows: dict | BucketedRows, stage: PatchStage, latent_shape: tuple[int, int, int], seed: int,
               step: int) -> tuple[PatchStage, int]:
    """The schedule's `stage` at the shape step `step` trains (BucketedRows.step_shape), and the full-size area
    its crops are a share of: a single-shape store's latent area."""
    if isinstance(rows, BucketedRows):
        return rows.step_shape(stage, seed, step)
    _, h, w = latent_shape
    return stage, h * w


def draw_bucketed_batch(
    rows: BucketedRows, spec: BatchSpec, stage: PatchStage, micro_batch: int, step: int, micro: int, rank: int,
    world: int, device: torch.device,
) -> Batch:
    """draw_batch for a bucketed store: a full-size stage at one bucket's shape, a patch stage as crops of all."""
    if rows.is_full_size(stage):
        b = rows.full_size_bucket(spec.seed, step, micro)
        _, h, w = rows.shapes[b]
        return draw_batch(rows.buckets[b], spec, replace(stage, height=h, width=w), micro_batch, step, micro, rank,
                          world, device)
    g_idx = make_generator("cpu", spec.seed, step, micro, "indices")
    indices = torch.randint(0, len(rows), (micro_batch,), generator=g_idx)
    per_rank = micro_batch // world
    sl = slice(rank * per_rank, (rank + 1) * per_rank)
    g = make_generator(device, spec.seed, step, micro, "batch")
    c, ph, pw = rows.shapes[0][0], stage.height, stage.width
    has_std = "std" in rows.buckets[0]
    eps = torch.randn((micro_batch, c, ph, pw), generator=g, device=device)[sl] if has_std else None
    cond = draw_rows(spec.conditioning, rows.cond, indices, g, spec.label_dropout, spec.caption_dropout, own=sl)
    sides = torch.tensor([s[1:] for s in rows.shapes])[rows.bucket_of[indices]]  # [micro_batch, 2]: (h, w)
    tops, lefts = crop_offsets_within(sides[:, 0], sides[:, 1], ph, pw, g, spec.crop_multiple)
    crops, coords = _crops(rows, spec, indices[sl], tops[sl], lefts[sl], ph, pw, eps, device)
    sigma, noise, route = draw_noise(spec, stage, c, micro_batch, step, g, device, sl)
    return Batch(crops, coords, sigma, noise, cond, route)


def _crops(rows: BucketedRows, spec: BatchSpec, own: Tensor, tops: Tensor, lefts: Tensor, ph: int, pw: int,
           eps: Tensor | None, device: torch.device) -> tuple[Tensor, Tensor]:
    """This rank's crops, gathered bucket by bucket from each row's own latent (a fresh posterior draw at the
    crop's shape when the store holds std), and their coordinates on each row's own grid."""
    c = rows.shapes[0][0]
    x0 = torch.empty((len(own), c, ph, pw), device=device)
    coords = torch.empty((len(own), 2, ph, pw), device=device)
    buckets = rows.bucket_of[own]
    for b in buckets.unique().tolist():
        at = (buckets == b).nonzero().flatten()
        part = rows.buckets[b]
        local = rows.local[own[at]]
        latents = [to_device(part[k][local.to(part[k].device)], device).float() for k in LATENTS if k in part]
        at_dev = at.to(device)
        cut, grid = gather_crops(torch.cat(latents, 1), tops[at_dev], lefts[at_dev], ph, pw,
                                 spec.local_coordinates, spec.coordinate_scale)
        x0[at_dev] = cut[:, :c] if eps is None else cut[:, :c] + cut[:, c:] * eps[at_dev]
        coords[at_dev] = grid
    return x0, coords


def rank_within(groups: Tensor) -> Tensor:
    """Each element's rank among the elements of its group, in order: [1, 0, 1, 1] -> [0, 0, 1, 2]."""
    out = torch.empty_like(groups)
    for g in groups.unique().tolist():
        at = (groups == g).nonzero().flatten()
        out[at] = torch.arange(len(at))
    return out


def check_buckets(store: LatentStore, held: Tensor | None, cfg: RunConfig) -> None:
    """Refuse at the start, in one line, a bucketed run that cannot train as asked: a bucket with fewer than
    MIN_BUCKET_IMAGES training images, or a patch crop larger than some bucket's shorter side."""
    keep = torch.ones(len(store), dtype=torch.bool)
    if held is not None:
        keep[held] = False
    bucket_of, items = store.bucket_of, store.items
    for b in range(len(store.bucket_latent_shapes)):
        members = (bucket_of == b).nonzero().flatten().tolist()
        trained = {items[i].sha256: items[i].file for i in members if keep[i]}
        if len(trained) < MIN_BUCKET_IMAGES:
            raise UserError(_few_images(store, b, sorted(trained.values()),
                                        sorted({items[i].file for i in members if not keep[i]})))
    _, lat_h, lat_w = store.latent_shape
    crops = [s for s in PatchSchedule(cfg.patches, lat_h, lat_w, cfg.train.batch_size).stages
             if (s.height, s.width) != (lat_h, lat_w)]
    if not crops:
        return
    ph, pw = max(s.height for s in crops), max(s.width for s in crops)
    for b, (_, h, w) in enumerate(store.bucket_latent_shapes):
        if ph > h or pw > w:
            raise UserError(
                f"patches.sizes {cfg.patches.sizes} give {ph}x{pw} crops of the {lat_h}x{lat_w} square latent, larger "
                f"than bucket {b}'s latent {h}x{w} ({_pixels(store, b)}); lower patches.sizes to at most "
                f"{min(h, w)}/{lat_h} of the side, or re-encode with a smaller --max-aspect")


def _few_images(store: LatentStore, b: int, trained: list[str], held: list[str]) -> str:
    what = (f"1 training image ({trained[0]})" if len(trained) == 1 else
            f"no training image ({', '.join(held[:3])} held out)")
    fix = "add images of about that shape, or re-encode with a larger --bucket-step or a smaller --max-aspect so " \
          "they join a neighbouring bucket"
    if held:
        fix += ", or lower heldout.share"
    return (f"bucket {b} ({_pixels(store, b)}) of {store.path} has {what}, fewer than {MIN_BUCKET_IMAGES}, so its "
            f"full-size steps would repeat one image; {fix}")


def check_bucket_sides(store: LatentStore, multiple: int) -> None:
    """Every bucket's latent sides must divide into the network's token size (a full-size step takes them whole)."""
    for b, (_, h, w) in enumerate(store.bucket_latent_shapes):
        if h % multiple or w % multiple:
            step = store.info.factor * multiple
            raise UserError(f"bucket {b}'s latent {h}x{w} ({_pixels(store, b)}) of {store.path} is not divisible by "
                            f"the network's patch size {multiple}; re-encode with --bucket-step a multiple of {step}")


def _pixels(store: LatentStore, b: int) -> str:
    h, w = store.buckets[b]
    return f"{h}x{w} px, height x width"


def _rows_of(cond: dict[str, Tensor], rows: Tensor) -> dict[str, Tensor]:
    """Rows `rows` of each per-item conditioning tensor; null_* (one row, the empty caption's) stay whole."""
    return {k: v if k.startswith("null_") else v[rows.to(v.device)] for k, v in cond.items()}


