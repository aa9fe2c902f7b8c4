"""Held-out evaluation during training: the EMA's denoising loss on latents the run never trains on.

The held-out latents are a separate store (heldout.latents) or a share of the training store's source images
(heldout.share; an image and its flip go together). Every `heldout.every` steps the EMA is scored by
metrics.denoising (fixed sigma grid, fixed noise, full-size coordinates), the result is logged beside the
training loss, and the best checkpoint is kept for `sample` to load.
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
from latentpatch.errors import UserError
from latentpatch.metrics.denoising import DenoisingLoss, HeldoutSet, denoising_loss, store_heldout_set
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
    """The held-out set of a run and the best loss seen so far (restored from a checkpoint on resume)."""

    heldout: HeldoutSet
    best_loss: float = float("inf")
    best_step: int | None = None

    @classmethod
    def build(cls, cfg: RunConfig, store: LatentStore, spec: ConditioningSpec, tensors: dict[str, Tensor],
              rows: Tensor | None) -> HeldoutEval:
        """From a separate store, or from training-store rows `rows` (mean latents, their stored conditioning).
        The weighting's sd is the training store's latent std in both cases, so runs compare on one scale."""
        h, edm = cfg.heldout, cfg.edm
        sigma_data = store.latent_std()
        if h.latents:
            other = LatentStore(_existing(h.latents))
            other.require_latent_space(store.info.to_dict(), store.latent_shape,
                                       f"the training store {store.path} holds",
                                       "encode the held-out images like the training images")
            heldout = store_heldout_set(other, spec, num_sigmas=h.sigmas, seed=h.seed, limit=h.limit,
                                        P_mean=edm.P_mean, P_std=edm.P_std, sigma_data=sigma_data)
        else:
            rows = rows[: h.limit]
            heldout = HeldoutSet(tensors["mean"][rows], num_sigmas=h.sigmas, seed=h.seed, P_mean=edm.P_mean,
                                 P_std=edm.P_std, cond=select_rows(spec, tensors, rows), sigma_data=sigma_data)
        return cls(heldout)

    def evaluate(self, ema: torch.nn.Module, step: int) -> tuple[DenoisingLoss, bool]:
        """The EMA's held-out loss, and whether it is the best so far (then remembered)."""
        loss = denoising_loss(ema, self.heldout)
        better = loss.mean < self.best_loss
        if better:
            self.best_loss, self.best_step = loss.mean, step
        return loss, better

    def state(self) -> dict:
        return {"heldout_best": {"loss": self.best_loss, "step": self.best_step}}

    def restore(self, state: dict) -> None:
        best = state.get("heldout_best") or {}
        self.best_loss, self.best_step = float(best.get("loss", float("inf"))), best.get("step")


def _existing(path: str) -> Path:
    if not Path(path).is_dir():
        raise UserError(f"heldout.latents {path} does not exist (make it with `latentpatch encode`)")
    return Path(path)
