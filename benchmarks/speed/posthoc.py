"""Post-hoc EMA curves for speed to quality (EDM2's lever for an EMA that does not lag any arm).

An arm ending in `+phema` trains exactly as its base arm (the profiles read the weights, never change them) and
snapshots two power-function EMA profiles (relative std 0.05 and 0.10) at every held-out evaluation. At every
`stride`-th evaluation this reconstructs the EMA at each relative std of GRID from the snapshots so far
(`latentpatch.training.posthoc_score.score_posthoc`, the run's own held-out loss) and keeps the lowest: the
post-hoc curve, what a user who picks the EMA length after training gets at that time. Choosing the length on
the same held-out set it is reported on favours the post-hoc curve a little, as keeping the best checkpoint does.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from latentpatch.training.posthoc_ema import read_snapshots
from latentpatch.training.posthoc_score import score_posthoc

PHEMA = ["train.posthoc_stds=[0.05, 0.1]", "train.posthoc_every=EVAL"]  # EVAL: the run's --eval-every
GRID = (0.02, 0.035, 0.05, 0.07, 0.1, 0.13, 0.17, 0.22)
CACHE = "posthoc-curve.json"


def posthoc_curve(run: Path, seconds: dict[int, float], budget_s: float,
                  stride: int) -> list[tuple[float, float, float]]:
    """(training seconds, lowest held-out loss over GRID, its std) at every `stride`-th snapshot within the
    budget and the last; `seconds` maps a logged step to the run's training seconds (snapshots fall on logged
    steps). Cached in the run folder (a rerun reads it)."""
    cache = run / CACHE
    done = {int(k): v for k, v in json.loads(cache.read_text()).items()} if cache.is_file() else {}
    steps = [s.step for s in read_snapshots(run) if 0 < s.step and seconds.get(s.step, float("inf")) <= budget_s]
    chosen = sorted(set(steps[stride - 1::stride]) | set(steps[-1:]))
    for step in chosen:
        if step not in done:
            scores = score_posthoc(run, list(GRID), step, device="cpu")
            best = min(scores, key=lambda x: x.loss)
            done[step] = [best.loss, best.std, {f"{x.std:.3f}": x.loss for x in scores}]
            for x in scores:  # the reconstructions are checkpoint folders: keep the disk small
                shutil.rmtree(x.checkpoint, ignore_errors=True)
            cache.write_text(json.dumps(done, indent=1))
    return [(seconds[s], done[s][0], done[s][1]) for s in chosen]


def posthoc_table(curves: dict[str, dict[int, list]], ema_curves: dict[str, dict[int, list]], budget_s: float) -> str:
    """Per +phema arm, mean over seeds: at the last post-hoc point at or before a quarter, half and all of the
    budget, the training EMA's held-out loss at its last evaluation at or before that snapshot and the best
    post-hoc one (its std)."""
    import statistics

    lines = ["| at s | arm | training EMA (half-life) | best post-hoc EMA | its std (per seed) |",
             "|---:|---|---:|---:|---|"]
    for frac in (0.25, 0.5, 1.0):
        t = frac * budget_s
        for arm, by_seed in curves.items():
            ph = {seed: [p for p in c if p[0] <= t + 1e-9][-1:] for seed, c in by_seed.items()}
            if not all(ph.values()):  # a seed with no post-hoc point yet
                continue
            ph = {seed: p[0] for seed, p in ph.items()}
            # the training EMA's last evaluation at or before the snapshot (on a grid of training time the
            # snapshots, every N steps, fall between evaluations)
            ema = [[loss for s, loss in ema_curves[arm][seed] if s <= p[0] + 1e-9][-1] for seed, p in ph.items()]
            lines.append(f"| {t:.0f} | {arm} | {statistics.fmean(ema):.4f} | "
                         f"{statistics.fmean(p[1] for p in ph.values()):.4f} | "
                         f"{', '.join(f'{p[2]:.3f}' for p in ph.values())} |")
    return "\n".join(lines) + "\n"
