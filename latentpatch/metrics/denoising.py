"""Held-out full-size denoising loss: EDM's training objective on latents the run never trained on, made exact.

    L(sigma) = lambda(sigma) E ||D(x0 + sigma n; sigma) - x0||^2 / (C h w),  lambda = (sigma^2 + sd^2) / (sigma sd)^2

(Karras et al. 2022, eq. 2 with the Table 1 weighting.) Four things make it comparable between checkpoints,
runs and machines: the noise levels are the fixed mid-quantiles of the training log-normal
(`edm.heldout_sigma_grid`), image i's noise at every level comes from its own seed (`edm.fixed_noise`, drawn
on the CPU), the network sees the whole latent with the full coordinate grid, as sampling does, and the
weighting's sd follows one rule: the training store's measured std (`store_sigma_data`, the run's
edm.sigma_data unless a config sets it), recorded in run.json, so training's held-out figure and `latentpatch
eval`'s agree and runs trained with other preconditioning on one store are scored on one scale. The mean
over the grid is then a quadrature of the training loss's expectation over sigma. Needs no pretrained network.

For latents x0 ~ N(0, sd^2 I) with sd their std the ideal denoiser has expected L(sigma) exactly 1 at every
sigma, so 1 is the floor for Gaussian data; structure in real data lets a model score below it.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor, nn

from latentpatch.conditioning import Conditioning, ConditioningSpec
from latentpatch.data.store import LatentStore
from latentpatch.diffusion.edm import denoising_loss_at, fixed_noise, heldout_sigma_grid
from latentpatch.errors import UserError
from latentpatch.patches import full_coordinates
from latentpatch.seeding import derive_seed

if TYPE_CHECKING:
    from latentpatch.runs import LoadedRun

Grid = Callable[[int, tuple[int, int]], Tensor]  # (levels, latent (h, w)) -> [levels] ascending


def store_sigma_data(store: LatentStore) -> float:
    """The one rule for a run's data std: its training store's measured latent std, to 4 places. It is the
    preconditioning's sigma_data when the config leaves it unset, and the held-out weighting's sd always."""
    return round(store.latent_std(), 4)


def run_weight_sd(loaded: LoadedRun) -> float:
    """The held-out weighting's sd a run was scored with in training (run.json); for a run recorded before
    that field, its training store's rule when the store is still there, else its sigma_data."""
    recorded = (loaded.info.get("heldout") or {}).get("weight_sd")
    if recorded is not None:
        return float(recorded)
    train_store = Path(loaded.info.get("latents") or "")
    if loaded.info.get("latents") and train_store.is_dir():
        return store_sigma_data(LatentStore(train_store))
    return float(loaded.cfg.edm.sigma_data)


@dataclass
class DenoisingLoss:
    sigmas: list[float]  # the fixed grid, ascending
    per_sigma: list[float]  # mean over held-out images at each sigma
    mean: float  # mean over the grid (equal weights: the grid points are equal-probability quantiles)
    n_images: int
    seed: int
    weight_sigma_data: float  # the sd of the weighting lambda(sigma): the training store's measured std
    # A store with aspect buckets: per bucket {"bucket", "latent": [h, w], "images", "mean", "per_sigma"}
    per_bucket: list[dict[str, Any]] | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.per_bucket is None:  # a single-shape store's record reads as it always did
            del d["per_bucket"]
        return d


class HeldoutSet:
    """Held-out latents [n, C, h, w] (+ per-image conditioning) with their fixed noise levels and noise seeds.

    Build once, score many checkpoints: a benchmark calls `denoising_loss(precond, heldout)` every few seconds.
    """

    def __init__(
        self, latents: Tensor, *, num_sigmas: int = 8, seed: int = 0, P_mean: float = -1.2, P_std: float = 1.2,
        cond: Conditioning | None = None, sigma_data: float | None = None, ids: Tensor | None = None,
        coordinate_scale: str = "per-axis", grid: Grid | None = None,
    ) -> None:
        """`ids`: each image's number in a larger set it is part of (a bucket of a BucketedHeldoutSet), which
        names its noise seed; `coordinate_scale`: the run's patches.coordinate_scale (non-square latents); `grid`:
        the run's own fixed noise levels, (n, (h, w)) -> [n] ascending (a flow base's, denoiser.heldout_grid),
        else the mid-quantiles of EDM's log-normal (P_mean, P_std)."""
        if latents.ndim != 4 or len(latents) == 0:
            raise UserError(f"held-out latents must be a non-empty [n, C, h, w] tensor, got {tuple(latents.shape)}")
        if num_sigmas < 1:
            raise UserError(f"the held-out loss needs at least 1 noise level, got {num_sigmas}")
        self.x0 = latents.detach().to("cpu", torch.float32)
        h, w = self.x0.shape[2:]
        grid_sigmas = None if grid is None else grid(num_sigmas, (h, w))
        self.sigmas = (heldout_sigma_grid(num_sigmas, P_mean, P_std) if grid_sigmas is None
                       else grid_sigmas.to(torch.float32))
        self.seed = int(seed)
        self.cond = cond
        self.ids = ids
        self.coordinate_scale = coordinate_scale
        # The weighting's sd: given (a store's measured latent std), else these latents' own std.
        self.sigma_data = float(self.x0.double().std(unbiased=False)) if sigma_data is None else float(sigma_data)

    def __len__(self) -> int:
        return len(self.x0)

    def noise(self, index: int) -> Tensor:
        """[num_sigmas, C, h, w]: image `index`'s noise at each level, from its own seed (batch-independent)."""
        number = index if self.ids is None else int(self.ids[index])
        return fixed_noise((len(self.sigmas), *self.x0.shape[1:]), derive_seed(self.seed, number, "heldout-noise"))

    def cond_of(self, images: Tensor, device: torch.device) -> Conditioning | None:
        return None if self.cond is None else self.cond.select(images).to(device)


class BucketedHeldoutSet:
    """Held-out latents of several shapes (a store with aspect buckets): a HeldoutSet per bucket, whose images
    are scored at their own bucket's full size; `parts` pairs each with its bucket index."""

    def __init__(self, parts: list[tuple[int, HeldoutSet]]) -> None:
        self.parts = parts
        first = parts[0][1]
        self.sigmas, self.seed, self.sigma_data = first.sigmas, first.seed, first.sigma_data

    def __len__(self) -> int:
        return sum(len(part) for _, part in self.parts)


@torch.no_grad()
def denoising_loss(precond: nn.Module, heldout: HeldoutSet | BucketedHeldoutSet, *,
                   batch_size: int = 256) -> DenoisingLoss:
    """Score `precond` (an EDMPrecond, on its own device, float32) on every (image, sigma) pair of `heldout`;
    a bucketed set is scored bucket by bucket, and its loss per bucket reported too.

    Deterministic: the same model and set give bit-identical results on one machine and batch size.
    """
    if batch_size < 1:
        raise UserError(f"batch size must be at least 1, got {batch_size}")
    parts = heldout.parts if isinstance(heldout, BucketedHeldoutSet) else [(None, heldout)]
    n, s = len(heldout), len(heldout.sigmas)
    was_training = precond.training
    precond.eval()
    try:
        part_sums = [_loss_sums(precond, part, batch_size) for _, part in parts]
    finally:
        precond.train(was_training)
    sums = part_sums[0] if len(parts) == 1 else torch.stack(part_sums).sum(0)
    per_sigma = (sums / n).tolist()
    if not all(math.isfinite(v) for v in per_sigma):
        raise UserError(f"the held-out denoising loss is not finite ({per_sigma}): the model's weights are broken")
    per_bucket = None
    if isinstance(heldout, BucketedHeldoutSet):
        per_bucket = []
        for (b, part), part_sum in zip(parts, part_sums):
            mean = (part_sum / len(part)).tolist()
            per_bucket.append({"bucket": b, "latent": list(part.x0.shape[2:]), "images": len(part),
                               "mean": sum(mean) / s, "per_sigma": mean})
    return DenoisingLoss(
        sigmas=heldout.sigmas.tolist(), per_sigma=per_sigma, mean=sum(per_sigma) / s, n_images=n, seed=heldout.seed,
        weight_sigma_data=heldout.sigma_data, per_bucket=per_bucket,
    )


def _loss_sums(precond: nn.Module, heldout: HeldoutSet, batch_size: int) -> Tensor:
    """[num_sigmas] float64: the loss at each level summed over the set's images (at their full size)."""
    device = next(precond.parameters()).device
    n, s = len(heldout), len(heldout.sigmas)
    _, h, w = heldout.x0.shape[1:]
    sums = torch.zeros(s, dtype=torch.float64)
    # Whole images per batch, each at every level: pair (i, j) is image i at sigma j.
    for images in torch.arange(n).split(max(1, batch_size // s)):
        levels = torch.arange(s).repeat(len(images))
        noise = torch.cat([heldout.noise(int(i)) for i in images])
        rows = images.repeat_interleave(s)
        loss = denoising_loss_at(
            precond, heldout.x0[rows].to(device),
            full_coordinates(len(rows), h, w, device=device, scale=heldout.coordinate_scale),
            heldout.sigmas[levels].to(device), noise.to(device), heldout.cond_of(rows, device),
            sigma_data=heldout.sigma_data,
        )
        sums.index_add_(0, levels, loss.double().cpu())
    return sums


def scored_rows(store: LatentStore, rows: Tensor, limit: int, seed: int) -> Tensor:
    """At most `limit` of the store rows `rows` (all when there are no more), chosen by `seed` and stratified by
    class label and bucket: each (label, bucket) group keeps its share of the limit (largest remainders), its rows
    taken in the order of (seed, image, flip) hashes, so the same rows on every resume, process and machine. The
    chosen rows keep their order in `rows` (a store encoded class by class is not scored on its first classes)."""
    if len(rows) <= limit:
        return rows
    items, bucket_of = store.items, store.bucket_of
    groups: dict[tuple, list[int]] = {}
    for r in rows.tolist():
        groups.setdefault((items[r].label is None, items[r].label or 0, int(bucket_of[r])), []).append(r)
    exact = {key: limit * len(members) / len(rows) for key, members in groups.items()}
    quota = {key: math.floor(q) for key, q in exact.items()}
    for key in sorted(groups, key=lambda k: (quota[k] - exact[k], k))[: limit - sum(quota.values())]:
        quota[key] += 1
    chosen = []
    for key, members in groups.items():
        order = sorted(members, key=lambda r: derive_seed(seed, items[r].sha256, int(items[r].flip), "scored"))
        chosen += order[: quota[key]]
    position = {r: k for k, r in enumerate(rows.tolist())}
    return torch.tensor(sorted(chosen, key=position.__getitem__), dtype=torch.long)


def bucketed_heldout_set(
    store: LatentStore, rows: Tensor, cond: Conditioning | None, *, num_sigmas: int = 8, seed: int = 0,
    P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float | None = None, coordinate_scale: str = "per-axis",
    grid: Grid | None = None,
) -> BucketedHeldoutSet:
    """Rows `rows` of a store with aspect buckets (posterior means) and their conditioning `cond`, a HeldoutSet
    per bucket; image k of `rows` keeps noise seed k, as in a single-shape set."""
    bucket_of = store.bucket_of[rows]
    sigma_data = store.latent_std() if sigma_data is None else sigma_data  # one weighting for every bucket
    parts = []
    for b in bucket_of.unique().tolist():
        at = (bucket_of == b).nonzero().flatten()
        latents = store.load(rows[at].tolist(), names=("mean",))["mean"]
        parts.append((b, HeldoutSet(latents, num_sigmas=num_sigmas, seed=seed, P_mean=P_mean, P_std=P_std,
                                    cond=None if cond is None else cond.select(at),
                                    sigma_data=sigma_data, ids=at,
                                    coordinate_scale=coordinate_scale, grid=grid)))
    return BucketedHeldoutSet(parts)


def store_heldout_set(
    store: LatentStore | str | os.PathLike, spec: ConditioningSpec | None = None, *, num_sigmas: int = 8,
    seed: int = 0, limit: int | None = None, P_mean: float = -1.2, P_std: float = 1.2,
    sigma_data: float | None = None, coordinate_scale: str = "per-axis", grid: Grid | None = None,
) -> HeldoutSet | BucketedHeldoutSet:
    """A HeldoutSet of a latent store's first `limit` items (all by default), at their posterior means; of a
    store with aspect buckets, a BucketedHeldoutSet (each image at its own bucket's shape).

    The mean, not a posterior draw, keeps the loss deterministic. A conditional model (`spec`) is scored with
    the items' own conditioning: their labels (the null label where an item has none) and captions (the
    store's cached embeddings when the run's encoder made them, else embedded once with it). The weighting's
    sd is `sigma_data` (default: this store's measured latent std).
    """
    from latentpatch.conditioning.spec import TextSource
    from latentpatch.conditioning.stored import TEXT_FIELDS, condition_rows, select_rows
    from latentpatch.text.cache import HASH_KEY
    from latentpatch.text.identity import same_text_encoder

    store = store if isinstance(store, LatentStore) else LatentStore(_existing_store(store))
    spec = spec or ConditioningSpec()
    if len(store) == 0:
        raise UserError(f"held-out latent store {store.path} is empty")
    if limit is not None and int(limit) < 1:
        raise UserError(f"the held-out image limit must be at least 1, got {limit}")
    chosen = torch.arange(len(store)) if limit is None else scored_rows(store, torch.arange(len(store)), int(limit), seed)
    text = None
    if spec.text:
        rec = spec.text_encoder
        text = TextSource(rec, cached=same_text_encoder(store.manifest.text_encoder, rec))  # layer, padding too
        if any(store.items[int(i)].caption is None for i in chosen):
            raise UserError(f"the model is text-conditioned but items of {store.path} have no caption; encode the "
                            "held-out images with their captions")
    cached = store.load(names=(*TEXT_FIELDS, HASH_KEY)) if text is not None and text.cached else {}
    rows = condition_rows(spec, store, cached, text, missing_label="null")
    return heldout_set(store, chosen, select_rows(spec, rows, chosen), num_sigmas=num_sigmas, seed=seed,
                       P_mean=P_mean, P_std=P_std, sigma_data=sigma_data, coordinate_scale=coordinate_scale, grid=grid)


def heldout_set(
    store: LatentStore, rows: Tensor, cond: Conditioning | None, *, num_sigmas: int = 8, seed: int = 0,
    P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float | None = None, coordinate_scale: str = "per-axis",
    grid: Grid | None = None,
) -> HeldoutSet | BucketedHeldoutSet:
    """Store rows `rows` (their posterior means) and their conditioning `cond` as a held-out set: a HeldoutSet,
    or of a store with aspect buckets a BucketedHeldoutSet (each image at its own bucket's shape). The weighting's
    sd is `sigma_data` (default: this store's measured latent std)."""
    sigma_data = store.latent_std() if sigma_data is None else sigma_data
    if store.bucketed:
        return bucketed_heldout_set(store, rows, cond, num_sigmas=num_sigmas, seed=seed, P_mean=P_mean, P_std=P_std,
                                    sigma_data=sigma_data, coordinate_scale=coordinate_scale, grid=grid)
    return HeldoutSet(store.load(rows.tolist(), names=("mean",))["mean"], num_sigmas=num_sigmas, seed=seed,
                      P_mean=P_mean, P_std=P_std, cond=cond, sigma_data=sigma_data, coordinate_scale=coordinate_scale,
                      grid=grid)


def _existing_store(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"held-out latent store {path} does not exist (make one with `latentpatch encode`)")
    return path


def run_denoising_loss(
    loaded: LoadedRun, store: LatentStore | str | os.PathLike, *, num_sigmas: int = 8, seed: int = 0,
    limit: int | None = None, batch_size: int = 256,
) -> DenoisingLoss:
    """The held-out loss of a `runs.load_run` result on a held-out latent store."""
    from latentpatch.runs import store_latent_shape

    store = store if isinstance(store, LatentStore) else LatentStore(_existing_store(store))
    store.require_latent_space(loaded.info.get("autoencoder") or {}, store_latent_shape(loaded.info),
                               f"the run {loaded.run_dir} was trained on",
                               "encode the held-out images with the run's autoencoder, at its resolution")
    from latentpatch.denoiser import heldout_grid

    edm = loaded.cfg.edm
    heldout = store_heldout_set(store, loaded.spec, num_sigmas=num_sigmas, seed=seed, limit=limit,
                                P_mean=edm.P_mean, P_std=edm.P_std, sigma_data=run_weight_sd(loaded),
                                coordinate_scale=loaded.cfg.patches.coordinate_scale, grid=heldout_grid(loaded.cfg))
    return denoising_loss(loaded.precond, heldout, batch_size=batch_size)


__all__ = [
    "BucketedHeldoutSet", "DenoisingLoss", "HeldoutSet", "bucketed_heldout_set", "denoising_loss", "heldout_set",
    "run_denoising_loss", "run_weight_sd", "scored_rows", "store_heldout_set", "store_sigma_data",
]
