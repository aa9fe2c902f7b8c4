"""Checks 1-3: the real trainer against a plain loop of the same DiT, its share of the matmul rate, the patch
schedule's images/s, and torch.compile's graphs per stage.

One `latentpatch.train` run over the patch schedule (full-size steps at batch B, half-side steps at 2B) on a
synthetic latent store written by the project's store writer; after each trainer step its callback runs one
step of the plain loop of the same stage (same model config and seed, AdamW, EDM loss, same shapes, the same
compile), so load drifts over both arms alike. Trainer steps are timed step to step, the plain loop's step by
itself; the first `warmup` steps of each stage are not timed. FLOPs: torch.utils.flop_counter on one forward
and backward of the uncompiled model.
"""

from __future__ import annotations

import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from torch._dynamo.utils import counters  # graphs compiled so far: the only record of recompiles there is

import latentpatch as lp
from latentpatch.denoiser import build_precond
from latentpatch.diffusion.edm import denoising_loss_at

from ...throughput.measure import matmul_peak, step_flops
from ...throughput.synthetic import make_store, plain_inputs
from .common import C, Context, Row, clock, median, ratio_row


def run_matmul(ctx: Context) -> list[Row]:
    """Check 0: the matmul rate every utilisation figure is a share of (bf16 8192^3 on CUDA, fp32 on the CPU)."""
    ctx.peak = matmul_peak(ctx.device, lambda: clock(ctx.device))
    return [Row("0 matmul rate", round(ctx.peak / 1e12, 2), "TFLOP/s", "report (H200 bf16 ~790)", None,
                f"{'bf16 8192^3' if ctx.bf16 else 'fp32 1536^3 (smoke)'}, 3 s of products")]


def trainer_config(ctx: Context, model: list[str], batch: int, stages: str, steps: int):
    patches = ["patches.real_p=0.5", "patches.sizes=[0.5]"] if stages == "schedule" else \
        ["patches.real_p=1", "patches.sizes=[]"]
    return lp.load_config(None, model + patches + [
        "model.attention=sdpa", f"train.batch_size={batch}", "edm.sigma_data=1.0", "optim.warmup_steps=1",
        "train.log_every=100000", "train.ckpt_every=100000", "train.keep_checkpoints=1", f"train.max_steps={steps}",
        "heldout.share=0",  # steps only: no held-out evaluation (on by default for a small store)
        f"train.precision={ctx.precision()}", f"train.compile={str(ctx.sizes.compile_backend == 'inductor').lower()}"])


class PlainLoop:
    """zero_grad, forward under autocast, backward, AdamW.step on fixed tensors of one stage."""

    def __init__(self, ctx: Context, model, side: int, batch: int, seed: int) -> None:
        self.ctx, self.model = ctx, model
        self.inputs = plain_inputs(side, batch, ctx.sizes.latent, ctx.device, seed=seed)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)  # the trainer's optimiser

    def loss(self) -> torch.Tensor:
        with self.ctx.autocast():
            return denoising_loss_at(self.model, *self.inputs, sigma_data=1.0).mean()

    def step(self) -> float:
        t0 = clock(self.ctx.device)
        self.optimizer.zero_grad(set_to_none=True)
        self.loss().backward()
        self.optimizer.step()
        return clock(self.ctx.device) - t0


def plain_model(ctx: Context, cfg):
    torch.manual_seed(cfg.train.seed)  # the trainer's initial weights
    model = build_precond(cfg, C, device=ctx.device).to(ctx.device).train()
    backend = ctx.sizes.compile_backend
    return model, (torch.compile(model, dynamic=False, backend=backend) if backend else model)


def graphs() -> int:
    return int(counters["stats"]["unique_graphs"])


def run_b(ctx: Context) -> list[Row]:
    """Checks 1, 2 (DiT-B/2 and the schedule's images/s) and 3 from one scheduled trainer run."""
    s = ctx.sizes
    full, half = s.latent, s.latent // 2
    cfg = trainer_config(ctx, s.dit_b, s.batch, "schedule", s.train_steps)
    eager, compiled = plain_model(ctx, cfg)
    loops = {full: PlainLoop(ctx, compiled, full, s.batch, 0), half: PlainLoop(ctx, compiled, half, 2 * s.batch, 1)}
    flops = {side: step_flops(PlainLoop(ctx, eager, side, loop.inputs[0].shape[0], 2).loss)
             for side, loop in loops.items()}
    eager.zero_grad(set_to_none=True)
    times = {arm: defaultdict(list) for arm in ("trainer", "plain")}
    new_graphs = {arm: {"warm": defaultdict(int), "late": defaultdict(int)} for arm in ("trainer", "plain")}
    seen, nimg, mark = defaultdict(int), [], {"t": None, "g": graphs()}

    def callback(info) -> None:
        now, side = clock(ctx.device), info.patch[0]
        seen[side] += 1
        phase = "warm" if seen[side] <= s.warmup else "late"
        new_graphs["trainer"][phase][side] += graphs() - mark["g"]
        if phase == "late" and mark["t"] is not None:
            times["trainer"][side].append(now - mark["t"])
            nimg.append(info.batch_size * side * side / full**2)
        g0 = graphs()
        t = loops[side].step()
        new_graphs["plain"][phase][side] += graphs() - g0
        if phase == "late":
            times["plain"][side].append(t)
        mark["g"], mark["t"] = graphs(), clock(ctx.device)

    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(Path(tmp) / "store", full)
        lp.train(cfg, store, Path(tmp) / "run", device=ctx.device, progress=False, callback=callback)
    med = {arm: {side: median(times[arm][side]) for side in loops} for arm in times}
    rows = []
    for side, stage in ((full, "full"), (half, "half")):
        b = loops[side].inputs[0].shape[0]
        rows.append(ratio_row(f"1 trainer/plain step, {stage} {side}x{side} x{b}", med["trainer"][side],
                              med["plain"][side], 1.05,
                              f"medians of {len(times['trainer'][side])} steps: trainer {med['trainer'][side]:.4f} s, "
                              f"plain {med['plain'][side]:.4f} s; compile={s.compile_backend}"))
    trainer_flops = sum(flops[side] * len(times["trainer"][side]) for side in loops)
    trainer_time = sum(sum(times["trainer"][side]) for side in loops)
    share = trainer_flops / trainer_time / ctx.peak
    per_stage = ", ".join(f"{side}x{side} {flops[side] / med['trainer'][side] / ctx.peak:.1%}" for side in loops)
    rows.append(Row("2 DiT-B/2 training, share of matmul rate", round(100 * share, 2), "%", ">= 35%",
                    bool(share >= 0.35), f"trainer over the schedule; per stage {per_stage}; "
                    f"{trainer_flops / trainer_time / 1e12:.1f} TFLOP/s achieved"))
    schedule_img_s = sum(nimg) / trainer_time
    full_img_s = s.batch / med["trainer"][full]
    rows.append(Row("2 schedule images/s vs full-size steps", round(schedule_img_s / full_img_s, 4), "x",
                    ">= 1.00x", bool(schedule_img_s >= full_img_s),
                    f"full-size-equivalent {schedule_img_s:.1f} img/s (real_p 0.5, sizes [0.5]) vs "
                    f"{full_img_s:.1f} img/s of full-size steps, {full}x{full} latents"))
    arm = "trainer" if s.compile_backend == "inductor" else "plain"  # smoke: only the plain loop is compiled
    per_stage_graphs = max(new_graphs[arm]["warm"].values(), default=0)
    late = sum(new_graphs[arm]["late"].values())
    note = f"{arm}{'' if arm == 'trainer' else ' (smoke: eager backend; the trainer is not compiled)'}; " \
           f"graph breaks: {sum(counters['graph_break'].values())}"
    rows.append(Row(f"3 compiled graphs per stage ({arm})", per_stage_graphs, "graphs", "= 1",
                    per_stage_graphs == 1 and min(new_graphs[arm]["warm"].values()) == 1,
                    note + f"; per stage {dict(new_graphs[arm]['warm'])}"))
    rows.append(Row(f"3 recompiles after warm-up ({arm})", late, "graphs", "= 0", late == 0, note))
    return rows


def run_xl(ctx: Context) -> list[Row]:
    """Check 2 for DiT-XL/2: the trainer at full size only, its share of the matmul rate."""
    s = ctx.sizes
    cfg = trainer_config(ctx, s.dit_xl, s.xl_batch, "full", s.xl_steps)
    times, mark, model = [], {"t": None, "n": 0}, {}

    def callback(info) -> None:
        now = clock(ctx.device)
        mark["n"] += 1
        if mark["n"] > s.warmup and mark["t"] is not None:
            times.append(now - mark["t"])
        model["precond"] = info.precond
        mark["t"] = clock(ctx.device)

    with tempfile.TemporaryDirectory() as tmp:
        store = make_store(Path(tmp) / "store", s.latent)
        lp.train(cfg, store, Path(tmp) / "run", device=ctx.device, progress=False, callback=callback)
    precond = model["precond"]
    inputs = plain_inputs(s.latent, s.xl_batch, s.latent, ctx.device)

    def loss():
        with ctx.autocast():
            return denoising_loss_at(precond, *inputs, sigma_data=1.0).mean()

    flops = step_flops(loss)
    share = flops / median(times) / ctx.peak
    return [Row("2 DiT-XL/2 training, share of matmul rate", round(100 * share, 2), "%", ">= 45%",
                bool(share >= 0.45), f"trainer, full size {s.latent}x{s.latent} x{s.xl_batch}, median of "
                f"{len(times)} steps {median(times):.4f} s; {flops / median(times) / 1e12:.1f} TFLOP/s achieved")]
