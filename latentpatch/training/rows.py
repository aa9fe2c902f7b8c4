"""The training data: a latent store's rows less the held-out ones, one bucket per latent shape.

A single-shape store is a store with one bucket, so every store trains through the one `TrainingRows`: a
full-size step takes one bucket (drawn in proportion to its training rows) at that bucket's shape; a patch step
draws rows from every bucket and cuts each crop from its row's own latent, with the coordinates of its place on
its own image's grid (Patch Diffusion's coordinate channels are what let one equal-shaped batch mix aspect
ratios); a zoomed-out step (patches.zoom_p) is a full-size step of the zoom store's smaller latents. How a batch
is drawn is training.batches'; this module holds the rows, where they live, and what a step's shape is.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from latentpatch.data.rows import ShardedRows
from latentpatch.errors import UserError
from latentpatch.patches import PatchSchedule, PatchStage
from latentpatch.seeding import make_generator

if TYPE_CHECKING:
    from latentpatch.config import RunConfig
    from latentpatch.data.store import LatentStore
    from latentpatch.training.zoom import ZoomData

MIN_BUCKET_IMAGES = 2  # a full-size step of a bucket with one image would be a batch of that image alone
LATENTS = ("mean", "std")


def training_mask(n: int, held: Tensor | None) -> Tensor:
    """[n] bool over a store's rows: True for the rows a run trains on, False for the held-out `held`."""
    keep = torch.ones(n, dtype=torch.bool)
    if held is not None:
        keep[held] = False
    return keep


@dataclass
class Bucket:
    """The latents of one shape: `latents[k]` [n_b, C, h, w] (posterior mean, and std when stored) of training
    rows `members` (indices into TrainingRows' rows), in their order."""

    latents: dict[str, Tensor | ShardedRows]
    members: Tensor  # [n_b] long, on the CPU
    shape: tuple[int, int, int]  # (C, h, w)
    scale: float = 1.0  # the latents are multiplied by this when drawn (zoomed-out views: training.zoom)


@dataclass
class TrainingRows:
    """Every training row's bucket and conditioning; `buckets[b]` holds bucket b's latents. Row t is row
    local[t] of bucket bucket_of[t]; `cond` holds the conditioning rows of all training rows (and null_*)."""

    buckets: list[Bucket]
    bucket_of: Tensor  # [n] long, on the CPU
    local: Tensor  # [n] long, on the CPU
    cond: dict[str, Tensor]
    nominal: tuple[int, int]  # the schedule's full size: the store's latent (of a bucketed store, the buckets' area)
    zoom: Bucket | None = None  # the zoomed-out latents of every training row (patches.zoom_p > 0)

    @classmethod
    def from_store(cls, store: LatentStore, cond: dict[str, Tensor], held: Tensor | None,
                   zoom: ZoomData | None = None) -> TrainingRows:
        """The store's latents (memory-mapped, per bucket) and the conditioning rows `cond` of all its items, less
        the held-out rows `held`; `zoom` adds the zoomed-out latents of each training row."""
        _, h, w = store.latent_shape
        rows = cls.split(store.bucket_rows(), store.bucket_of, cond, held, (h, w))
        if zoom is not None:
            keep = training_mask(len(store), held)
            rows.zoom = Bucket({k.removeprefix("zoom_"): _subset(v, keep) for k, v in zoom.rows.items()},
                               torch.arange(len(rows)), (store.latent_shape[0], *zoom.shape), zoom.scale)
        return rows

    @classmethod
    def split(cls, per_bucket: list[dict[str, Tensor | ShardedRows]], bucket_of: Tensor, cond: dict[str, Tensor],
              held: Tensor | None, nominal: tuple[int, int]) -> TrainingRows:
        """From each bucket's latent rows (`per_bucket[b]`: its items in manifest order), each item's bucket
        `bucket_of` [N], the items' conditioning rows `cond` (per item, and null_*) and the held-out items `held`."""
        keep = training_mask(len(bucket_of), held)
        trained = keep.nonzero().flatten()
        kept_bucket = bucket_of[trained]
        buckets = []
        for b, latents in enumerate(per_bucket):
            members = (bucket_of == b).nonzero().flatten()
            part = {k: _subset(v, keep[members]) for k, v in latents.items() if k in LATENTS}
            buckets.append(Bucket(part, (kept_bucket == b).nonzero().flatten(),
                                  tuple(int(s) for s in latents["mean"].shape[1:])))
        per_row = {k: v if k.startswith("null_") else v[trained] for k, v in cond.items()}
        return cls(buckets, kept_bucket.clone(), _rank_within(kept_bucket), per_row, nominal)

    def __len__(self) -> int:
        return len(self.bucket_of)

    @cached_property
    def counts(self) -> Tensor:
        """Training rows per bucket (counted once: every full-size step's bucket draw reads it)."""
        return torch.bincount(self.bucket_of, minlength=len(self.buckets))

    def place(self, device: torch.device, share: float) -> TrainingRows:
        """All rows on the training device when together they fit in `share` of its free memory (CUDA), else on
        the host, where each draw copies its rows over; the CPU reads them where they lie."""
        if device.type != "cuda":
            return self
        parts = [*self.buckets, *([self.zoom] if self.zoom else [])]
        size = sum(_nbytes(v) for part in parts for v in part.latents.values()) + sum(map(_nbytes, self.cond.values()))
        if size > share * torch.cuda.mem_get_info(device)[0]:
            return self

        def moved(part: Bucket) -> Bucket:
            return replace(part, latents={k: _materialised(v).to(device) for k, v in part.latents.items()})

        return replace(self, buckets=[moved(p) for p in self.buckets], zoom=self.zoom and moved(self.zoom),
                       cond={k: v.to(device) for k, v in self.cond.items()})

    def full_size_bucket(self, seed: int, step: int, micro: int) -> int:
        """The bucket a full-size micro-step trains on: drawn in proportion to the buckets' training rows."""
        if len(self.buckets) == 1:
            return 0
        g = make_generator("cpu", seed, step, micro, "bucket")
        return int(torch.multinomial(self.counts.double(), 1, generator=g))

    def step_shape(self, stage: PatchStage, seed: int, step: int) -> tuple[PatchStage, int]:
        """The stage as step `step` trains it (a full-size stage at its first micro-step's bucket shape) and the
        full-size area its crops are a share of (the images a step counts)."""
        full_area = self.nominal[0] * self.nominal[1]
        if stage.zoom or (stage.height, stage.width) != self.nominal:
            return stage, full_area
        _, h, w = self.buckets[self.full_size_bucket(seed, step, 0)].shape
        return replace(stage, height=h, width=w), h * w


def check_buckets(store: LatentStore, held: Tensor | None, cfg: RunConfig) -> None:
    """Refuse at the start, in one line, a run on aspect buckets that cannot train as asked: a bucket with fewer
    than MIN_BUCKET_IMAGES training images, or a patch crop larger than some bucket's shorter side."""
    if not store.bucketed:
        return
    keep, bucket_of, items = training_mask(len(store), held), store.bucket_of, store.items
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


def check_bucket_sides(store: LatentStore, multiple: int) -> None:
    """Every bucket's latent sides must divide into the network's token size (a full-size step takes them whole)."""
    if not store.bucketed:
        return
    for b, (_, h, w) in enumerate(store.bucket_latent_shapes):
        if h % multiple or w % multiple:
            step = store.info.factor * multiple
            raise UserError(f"bucket {b}'s latent {h}x{w} ({_pixels(store, b)}) of {store.path} is not divisible by "
                            f"the network's patch size {multiple}; re-encode with --bucket-step a multiple of {step}")


def _few_images(store: LatentStore, b: int, trained: list[str], held: list[str]) -> str:
    what = (f"1 training image ({trained[0]})" if len(trained) == 1 else
            f"no training image ({', '.join(held[:3])} held out)")
    fix = "add images of about that shape, or re-encode with a larger --bucket-step or a smaller --max-aspect so " \
          "they join a neighbouring bucket"
    if held:
        fix += ", or lower heldout.share"
    return (f"bucket {b} ({_pixels(store, b)}) of {store.path} has {what}, fewer than {MIN_BUCKET_IMAGES}, so its "
            f"full-size steps would repeat one image; {fix}")


def _pixels(store: LatentStore, b: int) -> str:
    h, w = store.buckets[b]
    return f"{h}x{w} px, height x width"


def _rank_within(groups: Tensor) -> Tensor:
    """Each element's rank among the elements of its group, in order: [1, 0, 1, 1] -> [0, 0, 1, 2]."""
    out = torch.empty_like(groups)
    for g in groups.unique().tolist():
        at = (groups == g).nonzero().flatten()
        out[at] = torch.arange(len(at))
    return out


def _subset(v: Tensor | ShardedRows, keep: Tensor) -> Tensor | ShardedRows:
    """Rows `keep` (a mask) of a tensor or of memory-mapped rows (without copying a shard)."""
    return v.subset(keep) if isinstance(v, ShardedRows) else v[keep]


def _materialised(v: Tensor | ShardedRows) -> Tensor:
    return v.materialize() if isinstance(v, ShardedRows) else v


def _nbytes(v: Tensor | ShardedRows) -> int:
    return v.nbytes if isinstance(v, ShardedRows) else v.numel() * v.element_size()
