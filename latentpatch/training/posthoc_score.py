"""Which post-hoc EMA to keep: each reconstruction scored by the run's own held-out loss.

The held-out set is rebuilt from the run folder as training built it (HeldoutEval.build on heldout.latents or
the run's share of its training store), scored by the same function in the same precision, so a score is the
number the training log's heldout_loss would have shown for those weights.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from latentpatch.errors import UserError


@dataclass
class PosthocScore:
    std: float
    checkpoint: Path  # the reconstruction's folder (RUN/posthoc/std-...)
    loss: float  # held-out denoising loss


def run_heldout(run_dir: str | os.PathLike):
    """The HeldoutEval a run evaluated on during training, rebuilt from its folder as its resume would build it."""
    from latentpatch.data.store import LatentStore
    from latentpatch.runs import read_run_info
    from latentpatch.training.batches import conditioning_rows
    from latentpatch.training.heldout import HeldoutEval
    from latentpatch.training.resolve import resolve_run

    run_dir = Path(run_dir)
    store_path = Path(read_run_info(run_dir).get("latents") or "")
    if not store_path.is_dir():
        raise UserError(f"scoring needs the run's training store {store_path} (its held-out images and the "
                        "weighting's sd), which is gone")
    run = resolve_run(None, LatentStore(store_path), run_dir, resume=True)
    if not run.cfg.heldout.enabled:
        raise UserError(f"run {run_dir} was trained without held-out evaluation (heldout.every is 0), so it has no "
                        "held-out loss to score with; train with heldout.latents or heldout.share")
    cond_rows = conditioning_rows(run.store, run.spec, run.text)
    return HeldoutEval.build(run.cfg, run.store, run.spec, cond_rows, run.plan.rows)


def score_posthoc(run_dir: str | os.PathLike, stds: list[float], step: int | None = None,
                  device: str | torch.device | None = None) -> list[PosthocScore]:
    """Write the reconstruction of each relative std in `stds` at `step` (write_posthoc_checkpoint) and score it
    on the run's held-out set; in the order of `stds`."""
    from latentpatch.device import resolve_device, training_autocast
    from latentpatch.metrics.denoising import denoising_loss
    from latentpatch.runs import load_run
    from latentpatch.training.posthoc_ema import check_std, write_posthoc_checkpoint

    for std in stds:
        check_std(std, "--std")
    heldout, device, scores = run_heldout(run_dir), resolve_device(device), []
    for std in stds:
        folder = write_posthoc_checkpoint(run_dir, std, step)
        loaded = load_run(run_dir, checkpoint=folder, device=device)
        with training_autocast(loaded.cfg.train.precision, device)():
            scores.append(PosthocScore(std, folder, denoising_loss(loaded.precond, heldout.heldout).mean))
    return scores
