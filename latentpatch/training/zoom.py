"""Zoomed-out views (issue 21): whole images at a lower resolution, from a second latent store of the same images.

A zoomed-out step costs what a crop of its size costs and carries the global layout that crops never show. Its
latents are those of the images downscaled and encoded by the same autoencoder (not pooled latents), so they are
read from a store made by `latentpatch encode SRC --resolution N`, aligned row by row with the training store by
(image sha256, flipped): `rows["zoom_mean"]` (and `zoom_std`) sit beside `rows["mean"]`, so held-out rows and
each rank's rows leave or follow them as they do the full-size ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from latentpatch.data.rows import ShardedRows
from latentpatch.data.store import LatentStore
from latentpatch.errors import UserError

MAKE_IT = ("make it with `latentpatch encode SRC --resolution N --out PATH` from the training images, with the "
           "same --vae and --flip as the training store")


@dataclass
class ZoomData:
    """The zoom store, its rows in the training store's row order, and the factor that gives them the training
    latents' std (the std EDM's sigma_data assumes)."""

    store: LatentStore
    rows: dict[str, ShardedRows]  # zoom_mean, zoom_std (when stored): row i is training store item i's
    scale: float

    @property
    def shape(self) -> tuple[int, int]:
        """(h, w) of the zoomed-out latents: the schedule's zoom stage."""
        _, h, w = self.store.latent_shape
        return h, w

    @classmethod
    def open(cls, path: str | Path, train: LatentStore) -> ZoomData:
        """Open and check the zoom store at `path` against training store `train`; UserError in one line."""
        if not Path(path).is_dir():
            raise UserError(f"patches.zoom_latents {path} does not exist; {MAKE_IT}")
        if train.bucketed:
            raise UserError(f"patches.zoom_p needs a single-shape training store; {train.path} holds aspect buckets")
        zoom = LatentStore(path)
        if zoom.bucketed:
            raise UserError(f"patches.zoom_latents {zoom.path} holds aspect buckets; {MAKE_IT}, without --buckets")
        zoom.require_latent_space(train.info.to_dict(), None, f"the training store {train.path} holds",
                                  f"encode patches.zoom_latents {zoom.path} with the same --vae")
        (c, h, w), (zc, zh, zw) = train.latent_shape, zoom.latent_shape
        if zc != c or not (zh < h and zw < w):
            raise UserError(f"patches.zoom_latents {zoom.path} holds latents {[zc, zh, zw]}, not smaller than the "
                            f"training store's {[c, h, w]}; encode it with a smaller --resolution")
        rows = zoom.rows()
        order = torch.tensor(aligned_rows(train, zoom))
        return cls(zoom, {f"zoom_{k}": v.subset(order) for k, v in rows.items()}, zoom_scale(train, zoom))


def aligned_rows(train: LatentStore, zoom: LatentStore) -> list[int]:
    """For each training store item (in manifest order), the zoom store's row of the same image and flip."""
    where = {(item.sha256, item.flip): i for i, item in enumerate(zoom.items)}
    order = []
    for item in train.items:
        row = where.get((item.sha256, item.flip))
        if row is None:
            view = " (flipped)" if item.flip else ""
            raise UserError(f"patches.zoom_latents {zoom.path} has no latent of {item.file}{view} of the training "
                            f"store {train.path}; {MAKE_IT}")
        order.append(row)
    return order


def zoom_scale(train: LatentStore, zoom: LatentStore) -> float:
    """The training latents' std over the zoomed-out latents' (each store's measured one): a downscaled image's
    latents are smoother, and scaled by this they have the std the preconditioning's sigma_data assumes."""
    std = zoom.latent_std()
    if not std > 0:
        raise UserError(f"the latents of patches.zoom_latents {zoom.path} have standard deviation {std}; "
                        "check the store (are all images the same?)")
    return train.latent_std() / std
