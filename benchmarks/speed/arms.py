"""The arms of speed to quality: each a list of config overrides on top of COMMON, named for what it changes.

A name starts from `full-size` (every step the whole latent) or `half-crops` (the library's default schedule:
real_p 0.5, half-side crops at any offset, twice the batch, sigma_data = the store's std); each `/X` after it
changes the training in one way, and `+phema` adds post-hoc EMA snapshots, which read the weights and never
change them. docs/benchmarks.md has the names these arms were recorded under before (renames.py maps them).
"""

from __future__ import annotations

from pathlib import Path

from .data import REGIMES
from .posthoc import PHEMA

COMMON = [  # the demo's DiT size and optimiser; every knob an arm studies pinned here, not left to the defaults
    "model.dit.preset=null", "model.dit.hidden_size=128", "model.dit.depth=4", "model.dit.num_heads=4",
    "model.dit.patch_size=2", "model.attention=sdpa", "optim.lr=0.001", "optim.warmup_steps=50",
    "train.batch_size=16", "train.precision=fp32", "train.ema_halflife_kimg=2.0", "train.ema_rampup=0.1",
    "train.log_every=100", "train.keep_checkpoints=1", "heldout.sigmas=8", "heldout.keep_best=true",
    "train.patience=0",  # the whole curve to the budget: no early stop (on by default for a small store)
    "patches.real_p=0.5", "patches.sizes=[0.5]", "patches.aligned=false", "edm.sigma_data=null", "routing.share=0",
]
FULL = ["patches.real_p=1", "patches.sizes=[]"]
ROUTING = ["routing.share=0.5", "routing.start=1", "routing.end=2"]  # the middle two of the four blocks
ALIGNED = ["patches.aligned=true"]  # crop offsets on the DiT's token grid
SD05 = ["edm.sigma_data=0.5"]  # EDM's image-space sigma_data instead of the store's std
QUARTER = ["patches.sizes=[0.25, 0.5]", "patches.size_weights=[2, 3]"]  # quarter-side crops beside the half-side

ARMS: dict[str, list[str]] = {
    "full-size": FULL,
    "full-size/sd0.5": FULL + SD05,
    "full-size/routing": FULL + ROUTING,
    "full-size+phema": FULL + PHEMA,
    "half-crops": [],  # COMMON itself: the library's defaults since the faces80 ablation
    "half-crops/sd0.5": SD05,  # the paper's latent schedule as first run here
    "half-crops/aligned": ALIGNED,
    "half-crops/aligned/sd0.5": ALIGNED + SD05,
    "half-crops/aligned/real_p0.25": ALIGNED + ["patches.real_p=0.25"],
    "half-crops/aligned/quarter": ALIGNED + QUARTER,
    "half-crops/aligned/routing": ALIGNED + ROUTING,
    # At 32x32 latents (mnist5k-128) a smaller crop is cheaper per pixel still: quarter-side crops (8x8) too, or
    # fewer full-size steps.
    "half-crops/quarter": QUARTER,
    "half-crops/routing": ROUTING,  # TREAD on the default schedule (64x64 latents: 1024 tokens at full size)
    "half-crops/real_p0.25": ["patches.real_p=0.25"],
    # Zoomed-out views (issue 21): a quarter of the steps are whole images at half the side (the same images
    # encoded at half the resolution: data.py's zoom store), taken from the full-size half.
    "half-crops/zoom": ["patches.zoom_p=0.25", "patches.zoom_latents=ZOOM"],
    # Post-hoc EMA (EDM2): the base arm's training plus snapshots of two EMA profiles at every evaluation;
    # posthoc.py reconstructs the best EMA length at each time.
    "half-crops+phema": PHEMA,
}


def needs_zoom(arms: list[str]) -> bool:
    """Whether an arm trains zoomed-out views (then the regime's half-side store is encoded too)."""
    return any("ZOOM" in o for arm in arms for o in ARMS[arm])


def arm_config(arm: str, seed: int, data: dict[str, Path], eval_every: int, regime: str,
               heldout_every: int | None = None, heldout_limit: int | None = None):
    """The arm's config: COMMON, the arm's overrides, the regime's labels, the seed and the held-out store.
    `eval_every`: the steps between post-hoc EMA snapshots (+phema) and, unless `heldout_every` is given (runs
    evaluated on a grid of training time ask for their evaluations), between held-out evaluations."""
    from latentpatch.config import load_config

    over = [o.replace("EVAL", str(eval_every or 1000)).replace("ZOOM", str(data.get("zoom"))) for o in ARMS[arm]]
    limit = [] if heldout_limit is None else [f"heldout.limit={heldout_limit}"]
    return load_config(None, COMMON + over + limit + [
        f"model.num_classes={REGIMES[regime].num_classes}", f"train.seed={seed}",
        f"heldout.latents={data['heldout']}",
        f"heldout.every={eval_every if heldout_every is None else heldout_every}"])
