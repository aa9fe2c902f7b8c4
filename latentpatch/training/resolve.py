"""A run is resolved once: the config, the latent store and the run folder (new or resumed) -> a frozen ResolvedRun.

Everything the start of a run decides is decided here, in this order, each by a pure function of its stage: what
the store decides (conditioning.spec: text widths and the conditioning; the latents' std as edm.sigma_data), the
config a resume must keep (training.resume), the held-out defaults of a small store (training.guard), the checks
of the data against the run. Nothing after it changes the config, and nothing is written until the session built
on it has passed its own checks (training.record).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentpatch.conditioning import ConditioningSpec, TextSource, derive_spec
from latentpatch.config import RunConfig
from latentpatch.data.store import LatentStore
from latentpatch.errors import UserError
from latentpatch.metrics.denoising import store_sigma_data
from latentpatch.runs import run_info
from latentpatch.training.guard import HeldoutPlan, choose_defaults
from latentpatch.training.resume import SavedRun, check_same_data, chosen_config
from latentpatch.training.rows import check_buckets
from latentpatch.training.zoom import ZoomData


@dataclass(frozen=True)
class ResolvedRun:
    """Everything a training session is built from; `info` is run.json as the start writes it."""

    cfg: RunConfig
    store: LatentStore
    run_dir: Path
    spec: ConditioningSpec
    text: TextSource | None  # where the text embeddings come from (None: no text)
    plan: HeldoutPlan
    zoom: ZoomData | None  # zoomed-out views (patches.zoom_p > 0)
    checkpoint: Path | None  # the checkpoint a resume continues from (None: a fresh start)
    info: dict[str, Any]


def resolve_run(request: RunConfig | None, latents: str | Path | LatentStore, run_dir: str | Path, *,
                resume: bool = False, max_steps: int | None = None) -> ResolvedRun:
    """Resolve a start: `request` (None: resume the folder's own config) on the store `latents` into `run_dir`.
    Every refusal (a differing config, other latents, a store the run cannot train on) is a UserError before
    anything is written."""
    store = latents if isinstance(latents, LatentStore) else LatentStore(latents)
    run_dir = Path(run_dir)
    saved = SavedRun.read(run_dir)
    if request is not None:  # what the store decides, before the request is compared with a saved config
        request, spec, text = with_store(request, store)
    cfg = chosen_config(request, saved, run_dir, resume, max_steps)
    if request is None:  # the saved config, resolved when it was saved: this only derives its spec
        cfg, spec, text = with_store(cfg, store)
    cfg, note = choose_defaults(cfg, store)  # a resumed run's were chosen at its start: nothing left to fill
    zoom = ZoomData.open(cfg.patches.zoom_latents, store) if cfg.patches.zoom_p > 0 else None
    checkpoint = saved.checkpoint if resume else None
    if checkpoint is not None:
        check_same_data(run_dir, saved.info, store, None if zoom is None else zoom.store)
    kept = (saved.info or {}) if checkpoint is not None else {}
    plan = HeldoutPlan.of(cfg, store, (kept.get("heldout") or {}).get("note", note))
    check_buckets(store, plan.rows, cfg)
    info = run_info(store, spec, heldout=plan.to_dict(), zoom=None if zoom is None else zoom.store)
    if "created" in kept:  # a resume keeps the date the run was created
        info["created"] = kept["created"]
    return ResolvedRun(cfg, store, run_dir, spec, text, plan, zoom, checkpoint, info)


def with_store(cfg: RunConfig, store: LatentStore) -> tuple[RunConfig, ConditioningSpec, TextSource | None]:
    """The config with what the store decides filled in (text widths from its encoder, edm.sigma_data from its
    measured latent std when unset), the conditioning spec, and where the text embeddings come from."""
    cfg, spec, text = derive_spec(copy.deepcopy(cfg), store)
    if cfg.edm.sigma_data is None:
        std = store_sigma_data(store)
        if not std > 0:
            raise UserError(f"the latents of {store.path} have standard deviation {std}, so edm.sigma_data cannot "
                            "follow them; check the store (are all images the same?) or set edm.sigma_data")
        cfg.edm.sigma_data = std
    return cfg, spec, text
