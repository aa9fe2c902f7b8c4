"""A small store is guarded by default: a held-out share, a few dozen evaluations, the best kept, early stopping.

Patch training's measured strength is small data, and small data is where a run trains past its best: on
faces20 (20 faces + flips, docs/benchmarks.md) full-size training's held-out loss is lowest at 128 of 300 s
and 72% higher at the end; on faces80 (160 rows) it is lowest at ~350 of 600 s. So unless the config says
otherwise (`heldout.share`, `heldout.every`, `train.patience` left null), a run on a store of at most
SMALL_STORE source images holds out SHARE of them (at least MIN_HELDOUT, at most heldout.limit), evaluates
the EMA EVALUATIONS times over the run, keeps the best checkpoint (what `sample` loads) and stops after
PATIENCE evaluations without a new best. A store of fewer than MIN_SOURCES images keeps them all (holding
out MIN_HELDOUT would take more than a fifth of its data), and a larger store trains exactly as configured.
What was chosen is written into the run's config.yaml (a resume keeps it) and run.json, and printed.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch

from latentpatch.config import RunConfig
from latentpatch.data.store import LatentStore
from latentpatch.metrics.denoising import store_sigma_data

# A few thousand images: faces20 and faces80 overfit within minutes; at 5000 a 10% share is 500 images,
# more than heldout.limit (256) scores, so the share is capped there and costs the run at most ~5% of its data.
SMALL_STORE = 5000
SHARE = 0.1
MIN_HELDOUT = 4  # a loss over fewer images than this is too noisy to pick a checkpoint by
MIN_SOURCES = 5 * MIN_HELDOUT  # below this, MIN_HELDOUT images would be more than a fifth of the data
EVALUATIONS = 40  # a few dozen points on the curve, whatever the run's length
# On the faces20 curves (an evaluation every 100 steps) the held-out loss falls smoothly to its best and then
# rises steadily: six evaluations after its best full-size is at 0.43 (best 0.371) and the default patch
# schedule at 0.303 (best 0.2975), both beyond the seed spread (<= 0.003). 10 evaluations (a quarter of a
# default run) of no new best is past that point with margin, while the smooth descent before the best never
# goes 10 evaluations without one. Measured with these defaults (docs/benchmarks.md, guard_defaults.py): both
# arms stopped 10 evaluations past their best, whose checkpoint was the better one on unseen faces.
PATIENCE = 10
# An evaluation scores up to heldout.limit (256) images at 8 noise levels, 2048 forward passes: about the cost of 10
# training steps of 64 (a step's backward pass costs twice its forward). Closer than that, evaluating would cost
# more than the training between evaluations; a run shorter than this evaluates at its start and its end.
MIN_EVERY = 10
# What choose_defaults fills when left null: a resume that leaves them null keeps the run's choice (resume.py),
# a fine-tune sets them null to choose for its own data (finetuning/finetune.py).
CHOSEN_KEYS = (("heldout", "share"), ("heldout", "every"), ("train", "patience"))


def choose_defaults(cfg: RunConfig, store: LatentStore) -> tuple[RunConfig, str | None]:
    """`cfg` with heldout.share, heldout.every and train.patience filled in where they are null, and a note
    when the defaults hold nothing out (a store too small to spare images, or a large one; None otherwise)."""
    cfg = copy.deepcopy(cfg)
    h, tc = cfg.heldout, cfg.train
    n = store.manifest.image_count
    small, note = n <= SMALL_STORE, None
    if h.latents:
        h.share = h.share or 0.0
    elif h.share is None:
        if h.every == 0:  # evaluation turned off
            h.share = 0.0
        elif not (small or h.every):  # a large store trains as configured
            h.share = 0.0
            note = (f"the store has {n} source images, more than {SMALL_STORE}: it trains as configured; set "
                    "heldout.share or heldout.latents to evaluate")
        elif n < MIN_SOURCES:
            h.share, h.every = 0.0, 0  # nothing to evaluate on, even when heldout.every asked for it
            note = (f"the store has {n} source images, fewer than {MIN_SOURCES}: too few to hold any out, so the run "
                    "trains on all of them without held-out evaluation or early stopping (give heldout.latents "
                    "to evaluate on other images)")
        else:
            h.share = min(max(MIN_HELDOUT, round(SHARE * n)), h.limit) / n
    if h.every is None:
        h.every = evaluation_interval(tc.max_steps) if (h.latents or h.share) else 0
    if tc.patience is None:
        tc.patience = PATIENCE if small and h.every else 0
    return cfg, note


def evaluation_interval(max_steps: int) -> int:
    """Steps between evaluations: EVALUATIONS over the run, never closer than MIN_EVERY (nor past its end)."""
    return max(math.ceil(max_steps / EVALUATIONS), min(MIN_EVERY, max_steps))


@dataclass
class HeldoutPlan:
    """What a run holds out and how it is evaluated: printed at the start, recorded in run.json."""

    rows: torch.Tensor | None  # training-store rows held out (None: a separate store, or none)
    files: list[str]  # their source files
    source_images: int  # of the training store
    every: int
    patience: int
    weight_sd: float  # the held-out weighting's sd: the training store's measured std (metrics.denoising)
    latents: str | None = None
    note: str | None = None

    @classmethod
    def of(cls, cfg: RunConfig, store: LatentStore, note: str | None = None) -> HeldoutPlan:
        from latentpatch.training.heldout import heldout_rows

        h = cfg.heldout
        rows = heldout_rows(store, h.share, cfg.train.seed) if h.share else None
        files = sorted({store.items[int(i)].file for i in rows}) if rows is not None else []
        return cls(rows, files, store.manifest.image_count, h.every, cfg.train.patience, store_sigma_data(store),
                   h.latents, note)

    def describe(self) -> str:
        """One line for the start of a run."""
        if not self.every:
            return f"held-out: none ({self.note or 'heldout.every=0 / heldout.share=0'})"
        if self.latents:
            what = f"the store {self.latents}"
        else:
            what = (f"{len(self.files)} of {self.source_images} source images ({len(self.rows)} store rows, flips "
                    "with their image), never trained on")
        stop = f"early stop after {self.patience} evaluations without a new best" if self.patience else "no early stop"
        off = "heldout.every=0" if self.latents else "heldout.share=0"
        return (f"held-out: {what}; evaluated every {self.every} steps; {stop}; `sample` loads the best "
                f"checkpoint (BEST). {off} turns this off")

    def to_dict(self) -> dict:
        return {"latents": self.latents, "source_images": self.source_images, "held_out_images": len(self.files),
                "held_out_rows": 0 if self.rows is None else len(self.rows), "files": self.files,
                "every": self.every, "patience": self.patience, "weight_sd": self.weight_sd, "note": self.note}
