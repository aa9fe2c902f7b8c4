"""What a training call returns (TrainResult, with the held-out line a run ends with), what a step callback
sees (StepInfo), and the error a diverged run stops with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from latentpatch.errors import UserError


class TrainingDiverged(UserError):
    """The loss or the weights stopped being finite; the last good checkpoint is kept."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    kimg: float  # full-size-equivalent images seen, / 1000
    checkpoint: Path | None  # the newest checkpoint (`sample` loads BEST when there is one, else this)
    loss: float | None  # mean loss over the last log interval
    seconds: float
    trained: int = 0  # steps this call trained (0: the run was already at train.max_steps)
    best: Path | None = None  # the checkpoint of the best held-out loss (checkpoints/BEST): what `sample` loads
    best_loss: float | None = None  # the EMA's held-out loss there
    best_step: int | None = None
    heldout_loss: float | None = None  # the last evaluation's held-out loss, at step `step`
    stopped_early: int = 0  # > 0: the run stopped after this many evaluations without a new best

    def summary(self) -> str | None:
        """The held-out line a run ends with (None without held-out evaluation)."""
        if self.best_loss is None or self.best_step is None:
            return None
        why = (f"stopped early at step {self.step}: no new best held-out loss in {self.stopped_early} evaluations. "
               if self.stopped_early else "")
        last = "" if self.heldout_loss is None else f" (last: {self.heldout_loss:.4f} at step {self.step})"
        where = f"BEST, {self.best.name}" if self.best is not None else "BEST"
        return (f"{why}Best held-out loss {self.best_loss:.4f} at step {self.best_step}{last}; "
                f"`latentpatch sample` uses that checkpoint ({where})")


# What a step callback returns to ask for a held-out evaluation after this step (True: stop after a checkpoint).
EVALUATE = "evaluate"


@dataclass
class StepInfo:
    """What a `callback` sees after each optimisation step (benchmarks evaluate and stop with it)."""

    step: int  # steps done
    nimg: float  # full-size-equivalent images seen
    loss_tensor: torch.Tensor  # this rank's mean loss of the step, on the device (reading it is a sync)
    patch: tuple[int, int]  # (height, width) of this step's crops
    batch_size: int  # samples in this step's global batch
    train_seconds: float  # the run's own time in optimisation steps so far, resumes included (training.clock)
    precond: torch.nn.Module  # the trained preconditioned denoiser (EDM, or a pretrained base's VP)
    ema: torch.nn.Module

    @property
    def loss(self) -> float:
        return float(self.loss_tensor)
