"""`latentpatch ema`: reconstruct the EMA of other widths from a run's post-hoc EMA snapshots (EDM2), optionally
scored by the run's held-out loss."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from latentpatch.errors import UserError


def _stds(text: str) -> list[float]:
    try:
        stds = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        stds = []
    if not stds:
        raise UserError(f"--std takes a comma list of relative stds like 0.05,0.10,0.15, got {text!r}")
    return stds


def register(app: typer.Typer) -> None:
    @app.command(
        "ema",
        context_settings={"help_option_names": ["-h", "--help"]},
        epilog="Examples: latentpatch ema runs/faces --std 0.05,0.10,0.15 --score.  "
        "latentpatch sample runs/faces --checkpoint runs/faces/posthoc/std-0.100-step-00020000 --n 16.",
    )
    def ema(
        run: Path = typer.Argument(..., help="Run folder trained with train.posthoc_stds (e.g. [0.05,0.1])."),
        std: str = typer.Option(..., "--std", help="Comma list of relative stds to reconstruct: the width of the averaging profile as a share of the training time (0.05 short, 0.15 long; EDM2's best are 0.05-0.15; at most 0.28)."),
        step: Optional[int] = typer.Option(None, "--step", help="Reconstruct at the last snapshot at or before this step (default: the last snapshot)."),
        score: bool = typer.Option(False, "--score", help="Also score each reconstruction with the run's own held-out loss (the training log's heldout_loss; needs a run trained with heldout.latents or heldout.share) and mark the lowest."),
        device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or cuda:N for --score (default: cuda when available)."),
    ) -> None:
        """Post-hoc EMA: the EMA of any relative std, reconstructed after training from the power-function EMA
        profiles the run snapshotted (train.posthoc_stds, every train.posthoc_every steps).

        A relative std is the width of the averaging profile as a share of the training time so far: 0.05 averages
        the last few percent of training, 0.15 a longer stretch. Each std becomes a checkpoint folder
        RUN/posthoc/std-S-step-N/ that `latentpatch sample RUN --checkpoint FOLDER` and `eval` load.
        """
        from latentpatch.training.posthoc_ema import check_std, write_posthoc_checkpoint
        from latentpatch.training.posthoc_score import score_posthoc

        stds = [check_std(s, "--std") for s in _stds(std)]
        if not score:
            for s in stds:
                typer.echo(f"std {s:.3f}: {write_posthoc_checkpoint(run, s, step)}")
            return
        scores = score_posthoc(run, stds, step, device=device)
        best = min(scores, key=lambda x: x.loss)
        typer.echo(f"{'std':>6}  {'held-out loss':>13}  checkpoint")
        for x in scores:
            typer.echo(f"{x.std:6.3f}  {x.loss:13.6f}  {x.checkpoint}{'  <- lowest' if x is best else ''}")
