"""Held-out evaluation during training: the EMA's denoising loss on latents the run never trains on.

The held-out latents are a separate store (heldout.latents) or a share of the training store's source images
(heldout.share; an image and its flip go together). Every `heldout.every` steps the EMA is scored by
metrics.denoising (fixed sigma grid, fixed noise, full-size coordinates), the result is logged beside the
training loss, the best checkpoint is kept for `sample` to load, and after `train.patience` evaluations
without a new best the run stops (early stopping). On a small store all of this is on by default (guard.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from latentpatch.conditioning import ConditioningSpec
from latentpatch.conditioning.stored import select_rows
from latentpatch.config import RunConfig
from latentpatch.data.store import LatentStore
from latentpatch.denoiser import heldout_grid
from latentpatch.errors import UserError
from latentpatch.metrics.denoising import (BucketedHeldoutSet, DenoisingLoss, HeldoutSet, denoising_loss, heldout_set,
                                           scored_rows, store_heldout_set, store_sigma_data)
from latentpatch.seeding import derive_seed


def heldout_rows(store: LatentStore, share: float, seed: int) -> Tensor:
    """The store rows of a `share` of its source images (at least one), chosen by (seed, file hash) alone."""
    files = sorted({item.sha256 for item in store.items}, key=lambda sha: derive_seed(seed, sha, "heldout"))
    chosen = set(files[: max(1, round(share * len(files)))])
    if len(chosen) == len(files):
        raise UserError(f"heldout.share={share} would hold out all {len(files)} source images of {store.path}; "
                        "lower it or give heldout.latents")
    return torch.tensor([i for i, item in enumerate(store.items) if item.sha256 in chosen], dtype=torch.long)


@dataclass
class HeldoutEval:
    """The held-out set of a run, the best loss seen so far and the evaluations since it (restored from a
    checkpoint on resume, so early stopping stops a resumed run where the whole run stops)."""

    heldout: HeldoutSet | BucketedHeldoutSet
    patience: int = 0  # evaluations without a new best before the run stops (0: never)
    best_loss: float = float("inf")
    best_step: int | None = None
    since_best: int = 0  # evaluations since the best (the step-0 one counts for nothing: no training yet)
    last_loss: float | None = None
    last_step: int | None = None

    @classmethod
    def build(cls, cfg: RunConfig, store: LatentStore, spec: ConditioningSpec, cond_rows: dict[str, Tensor],
              rows: Tensor | None) -> HeldoutEval:
        """From a separate store (heldout.latents), or from training-store rows `rows` (their posterior means and
        stored conditioning `cond_rows`, of every store item); at most heldout.limit images, chosen by heldout.seed
        across classes and buckets (metrics.denoising.scored_rows). The weighting's sd is the training store's rule
        (metrics.denoising.store_sigma_data) in both cases, as `latentpatch eval` uses, so the two agree."""
        h, edm = cfg.heldout, cfg.edm
        settings = dict(num_sigmas=h.sigmas, seed=h.seed, P_mean=edm.P_mean, P_std=edm.P_std,
                        sigma_data=store_sigma_data(store), coordinate_scale=cfg.patches.coordinate_scale,
                        grid=heldout_grid(cfg))
        if h.latents:
            other = LatentStore(_existing(h.latents))
            other.require_latent_space(store.info.to_dict(), store.latent_shape,
                                       f"the training store {store.path} holds",
                                       "encode the held-out images like the training images")
            heldout = store_heldout_set(other, spec, limit=h.limit, **settings)
        else:
            rows = scored_rows(store, rows, h.limit, h.seed)
            heldout = heldout_set(store, rows, select_rows(spec, cond_rows, rows), **settings)
        return cls(heldout, patience=cfg.train.patience or 0)

    def evaluate(self, ema: torch.nn.Module, step: int) -> tuple[DenoisingLoss, bool]:
        """The EMA's held-out loss, and whether it is the best so far (then remembered)."""
        loss = denoising_loss(ema, self.heldout)
        return loss, self.record(loss.mean, step)

    def record(self, loss: float, step: int) -> bool:
        """Count one evaluation's `loss` at `step`; True when it is a new best. The untrained step-0 score is a
        starting point for the curve, not a best to keep or a reason to stop."""
        self.last_loss, self.last_step = loss, step
        if step == 0:
            return False
        if loss < self.best_loss:
            self.best_loss, self.best_step, self.since_best = loss, step, 0
            return True
        self.since_best += 1
        return False

    @property
    def should_stop(self) -> bool:
        """`patience` evaluations in a row brought no new best."""
        return self.patience > 0 and self.since_best >= self.patience

    def state(self) -> dict:
        return {"heldout_best": {"loss": self.best_loss, "step": self.best_step, "since": self.since_best,
                                 "last_loss": self.last_loss, "last_step": self.last_step}}

    def restore(self, state: dict) -> None:
        best = state.get("heldout_best") or {}
        self.best_loss, self.best_step = float(best.get("loss", float("inf"))), best.get("step")
        self.since_best = int(best.get("since", 0))
        self.last_loss, self.last_step = best.get("last_loss"), best.get("last_step")


def _existing(path: str) -> Path:
    if not Path(path).is_dir():
        raise UserError(f"heldout.latents {path} does not exist (make it with `latentpatch encode`)")
    return Path(path)
