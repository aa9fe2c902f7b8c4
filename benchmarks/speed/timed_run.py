"""One (arm, seed) of speed to quality, trained for a budget of its own training time and evaluated on a grid of it.

The run's clock is the trainer's (latentpatch.training.clock): process CPU seconds of the optimisation steps on the
CPU (one torch thread here), CUDA-event time on a GPU; held-out evaluation, checkpoints and logging are outside
it. The step callback asks for a held-out evaluation (training.results.EVALUATE) after the first step whose
training time reaches the next multiple of --eval-every-s, and stops the run after the first step that reaches
--budget-s (the trainer evaluates and checkpoints that last step). So every arm is evaluated at the same
training times, whatever its steps cost, and a longer budget continues a run on the same grid.

    OMP_NUM_THREADS=1 python -m benchmarks.speed.timed_run CONFIG.yaml LATENTS RUN --budget-s 450 --eval-every-s 30

(to_quality.py starts one such process per run; a killed run resumes from its last checkpoint.)
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from latentpatch.training.results import EVALUATE, StepInfo


class TimeGrid:
    """The step callback: EVALUATE at each multiple of `every` seconds of training time, True (stop) at `budget`."""

    def __init__(self, budget: float, every: float) -> None:
        self.budget, self.every = budget, every
        self.next: float | None = None  # set from the first step's clock: a resumed run continues its grid

    def __call__(self, info: StepInfo) -> bool | str | None:
        t = info.train_seconds
        if self.next is None:
            self.next = (math.floor(t / self.every) + 1) * self.every
        if t >= self.budget:
            return True
        if t >= self.next:
            self.next = (math.floor(t / self.every) + 1) * self.every
            return EVALUATE
        return None


def finished(run: Path, budget: float) -> bool:
    """Whether the run's log already reaches `budget` training seconds (then there is nothing to train)."""
    from latentpatch.training.logging import read_log

    log = run / "log.jsonl"
    return log.is_file() and any(r.get("train_s", 0.0) >= budget for r in read_log(log))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("config", type=Path)
    ap.add_argument("latents", type=Path)
    ap.add_argument("run", type=Path)
    ap.add_argument("--budget-s", type=float, required=True)
    ap.add_argument("--eval-every-s", type=float, required=True)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if finished(args.run, args.budget_s):
        return
    import latentpatch as lp
    from latentpatch.checkpoints import latest_checkpoint

    torch.set_num_threads(1)
    resume = latest_checkpoint(args.run) is not None
    cfg = None if resume else lp.load_config(args.config)
    lp.train(cfg, args.latents, args.run, resume=resume, max_steps=10**9, device=args.device, progress=False,
             callback=TimeGrid(args.budget_s, args.eval_every_s))


if __name__ == "__main__":
    main()
