"""Check 8: a short speed-to-quality run: DiT-B/2, full-size training against the default patch schedule, the
same training seconds each, judged by the EMA's held-out loss (the trainer's own evaluation).

Data as speed to quality's (benchmarks.speed.data.write_faces): scikit-image's 100 LFW faces, encoded with the
builtin VAE by lp.encode; 20% held out. One seed and one short budget: a smoke test of the claim at GPU scale, not the
claim itself (docs/benchmarks.md has the full curves on the CPU).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import latentpatch as lp
from latentpatch.training.logging import read_log

from ...speed.data import write_faces
from .common import Context, Row

ARMS = {"full-size": ["patches.real_p=1", "patches.sizes=[]"], "patch schedule": []}  # [] = library defaults


def best_heldout(ctx: Context, store: Path, run: Path, arm: list[str]) -> tuple[float, int]:
    s = ctx.sizes
    cfg = lp.load_config(None, s.dit_b + arm + [
        "model.attention=sdpa", f"train.batch_size={s.stq_batch}", "optim.lr=3e-4", "optim.warmup_steps=50",
        "train.ema_halflife_kimg=2.0", "train.log_every=50", "train.ckpt_every=100000", "train.keep_checkpoints=1",
        "heldout.share=0.2", "heldout.every=25", "train.patience=0", "heldout.keep_best=false", f"train.precision={ctx.precision()}"])
    result = lp.train(cfg, store, run, device=ctx.device, progress=False,
                      callback=lambda info: info.train_seconds >= s.stq_seconds)
    losses = [r["heldout_loss"] for r in read_log(run / "log.jsonl") if "heldout_loss" in r]
    return min(losses), result.step


def run(ctx: Context) -> list[Row]:
    s = ctx.sizes
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lp.encode(write_faces(tmp / "faces", range(100), s.stq_side), tmp / "store", "builtin", s.stq_side,
                  device=str(ctx.device))
        best = {name: best_heldout(ctx, tmp / "store", tmp / name.replace(" ", "-"), arm)
                for name, arm in ARMS.items()}
    full, patch = best["full-size"][0], best["patch schedule"][0]
    return [Row("8 speed to quality: held-out loss, patch/full", round(patch / full, 4), "x", "<= 1.00x (report)",
                bool(patch <= full), f"{s.stq_seconds:g} training s per arm, one seed, 80 faces at "
                f"{s.stq_side} px: best held-out loss full-size {full:.4f} ({best['full-size'][1]} steps), "
                f"schedule {patch:.4f} ({best['patch schedule'][1]} steps)")]
