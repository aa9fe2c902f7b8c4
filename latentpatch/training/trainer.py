"""The training loop: patch schedule -> batch -> EDM loss -> AdamW -> EMA, with logs and checkpoints.

One straight loop (like DiT's train.py): each step draws one patch size from the schedule, accumulates
gradients over micro-batches, clips, steps, updates the EMA, and every so often logs, evaluates the EMA on
held-out latents, samples and checkpoints; it stops early when the held-out loss stops improving (on a small
store all of that is on by default: guard.py). All randomness of a step is a function of (seed, step), so
`resume=True` continues a killed run exactly and any number of ranks computes the same global batch.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from latentpatch import checkpoints as ckpt_io
from latentpatch.conditioning import ConditioningSpec
from latentpatch.config import RunConfig
from latentpatch.data.store import LatentStore
from latentpatch.denoiser import build_objective, build_precond, sampling_sigmas, size_multiple
from latentpatch.device import training_autocast
from latentpatch.distributed import DistInfo, all_reduce_mean, barrier, cleanup, init_distributed
from latentpatch.errors import UserError
from latentpatch.io import lock_folder
from latentpatch.patches import PatchSchedule, PatchStage
from latentpatch.runs import run_latent_shape, trained_shapes
from latentpatch.seeding import derive_seed
from latentpatch.training.batches import BatchSpec, conditioning_rows, draw_batch
from latentpatch.training.clock import TrainClock
from latentpatch.training.ema import ema_beta, make_ema, update_ema
from latentpatch.training.heldout import HeldoutEval
from latentpatch.training.logging import LogInterval, RunLogger, memory_stats, progress_postfix
from latentpatch.training.posthoc_ema import PosthocProfiles, snapshot_path
from latentpatch.training.record import record_run
from latentpatch.training.resolve import ResolvedRun, resolve_run
from latentpatch.training.results import EVALUATE, StepInfo, TrainingDiverged, TrainResult
from latentpatch.training.rows import TrainingRows, check_bucket_sides

LOCK_FILE = ".train.lock"


def train(
    cfg: RunConfig | None, latents: str | Path | LatentStore, out: str | Path, resume: bool = False,
    max_steps: int | None = None, device: str | torch.device | None = None, progress: bool = True,
    callback: Callable[[StepInfo], bool | None] | None = None,
    init_state: dict[str, torch.Tensor] | None = None,
) -> TrainResult:
    """Train on a latent store into run folder `out` (see latentpatch.runs); `cfg` None resumes.

    `callback(info)` runs on every rank after each step; returning True ends the run after a checkpoint, returning
    EVALUATE (training.results) evaluates on the held-out set now (benchmarks: at equal intervals of training time).
    `init_state` (plain state-dict keys of the preconditioned denoiser) replaces the random initial weights:
    fine-tuning. A small store is held out from and evaluated on by default, with early stopping (guard.py).
    """
    dist_info = init_distributed(device)
    lock = None
    try:
        lock = lock_folder(Path(out), LOCK_FILE, "train") if dist_info.is_main else None
        run = resolve_run(cfg, latents, out, resume=resume, max_steps=max_steps)
        return _Session.start(run, dist_info, init_state).run(progress, callback)
    finally:
        if lock is not None:
            lock.release()
        cleanup(dist_info)


def _all_finite(module: torch.nn.Module) -> bool:
    """One reduction and one sync for the whole module (a NaN or inf anywhere makes a norm non-finite)."""
    norms = torch._foreach_norm([p.detach() for p in module.parameters()])
    return bool(torch.isfinite(torch.stack(norms)).all())


def _check_batches(schedule: PatchSchedule, cfg: RunConfig, world: int) -> None:
    parts = cfg.train.grad_accum * world
    for stage in schedule.stages:
        if stage.batch_size % parts:
            raise UserError(
                f"the batch of patch {stage.height}x{stage.width} is {stage.batch_size} samples, not divisible "
                f"by train.grad_accum ({cfg.train.grad_accum}) x processes ({world}); change train.batch_size"
            )


@dataclass
class _Session:
    """Everything one run holds: data, denoiser, EMA, optimiser, schedule, counters."""

    cfg: RunConfig
    spec: ConditioningSpec
    batch_spec: BatchSpec
    run_dir: Path
    dist: DistInfo
    store: LatentStore
    rows: TrainingRows  # the training rows, one bucket per latent shape (training.rows)
    cond_rows: dict[str, torch.Tensor]  # the conditioning rows of every store item (previews index them by item)
    precond: torch.nn.Module
    ema: torch.nn.Module
    model: torch.nn.Module  # precond, wrapped in DDP and/or torch.compile
    optimizer: torch.optim.Optimizer
    schedule: PatchSchedule
    objective: Any  # noise levels and loss (denoiser.build_objective)
    heldout: HeldoutEval | None = None
    step: int = 0
    nimg: float = 0.0  # full-size-equivalent images seen
    last_ckpt: Path | None = None
    autoencoder: object = None  # loaded on the first preview grid
    unchecked: list = field(default_factory=list)  # (step, loss, grad norm) on the device, not yet read
    posthoc: PosthocProfiles | None = None  # post-hoc EMA profiles (train.posthoc_stds)
    clock: TrainClock | None = None  # the run's own training time (training.clock), continued on resume

    @classmethod
    def start(cls, run: ResolvedRun, dist: DistInfo, init_state=None) -> _Session:
        """The session of a resolved run, checked whole (a resume's checkpoint restored) before rank 0 writes the
        run's record: a start refused here leaves the run folder as it was."""
        cond_rows = conditioning_rows(run.store, run.spec, run.text)
        rows = TrainingRows.from_store(run.store, cond_rows, run.plan.rows, run.zoom)
        session = cls._build(run, dist, rows, cond_rows, init_state)
        if run.cfg.heldout.enabled:
            session.heldout = HeldoutEval.build(run.cfg, run.store, run.spec, cond_rows, run.plan.rows)
        if run.checkpoint is not None:
            session.restore(run.checkpoint)
        if dist.is_main:
            record_run(run, session.step)
            print(run.plan.describe(), flush=True)
        barrier(dist)
        session.rows = rows.place(dist.device, run.cfg.train.data_device_share)
        session.warn_if_nothing_to_train()
        if dist.distributed:
            session.model = DistributedDataParallel(session.precond)
        if run.cfg.train.compile:  # one static graph per patch stage (each stage has its own shapes), none after
            from torch._dynamo import config as dynamo_config

            shapes = len(session.schedule.stages) + len(rows.buckets)  # and one per bucket's full size
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, shapes + 1)
            session.model = torch.compile(session.model, dynamic=False)
        return session

    @classmethod
    def _build(cls, run: ResolvedRun, dist: DistInfo, rows: TrainingRows, cond_rows: dict,
               init_state) -> _Session:
        """The denoiser (initial weights a function of the seed alone), EMA, optimiser and schedule."""
        cfg, store = run.cfg, run.store
        channels, lat_h, lat_w = store.latent_shape
        tc, oc = cfg.train, cfg.optim
        torch.manual_seed(tc.seed)
        precond = build_precond(cfg, channels, device=dist.device, init_state=init_state).to(dist.device)
        ema = make_ema(precond)
        # The fused kernel (CUDA and CPU): on a CPU thread it steps DiT-S's 33M parameters in 35 ms, not 160.
        optimizer = torch.optim.AdamW(precond.parameters(), lr=oc.lr, betas=tuple(oc.betas), eps=oc.eps,
                                      weight_decay=oc.weight_decay, fused=True)
        multiple = size_multiple(precond.net)
        check_bucket_sides(store, multiple)
        schedule = PatchSchedule(cfg.patches, lat_h, lat_w, tc.batch_size, multiple_of=multiple, seed=tc.seed,
                                 zoom_shape=None if run.zoom is None else run.zoom.shape)
        _check_batches(schedule, cfg, dist.world_size)
        if dist.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        objective = build_objective(cfg)
        batch_spec = BatchSpec.from_config(cfg, run.spec, multiple, objective)
        return cls(cfg, run.spec, batch_spec, run.run_dir, dist, store, rows, cond_rows, precond, ema, precond,
                   optimizer, schedule, objective,
                   posthoc=PosthocProfiles(precond, tc.posthoc_stds) if tc.posthoc_stds else None,
                   clock=TrainClock(dist.device))

    def warn_if_nothing_to_train(self) -> None:
        if self.heldout is not None and self.heldout.should_stop:
            warnings.warn(f"run {self.run_dir} stopped early at step {self.step} (no new best held-out loss in "
                          f"{self.heldout.since_best} evaluations): nothing to train", stacklevel=4)
        elif self.step >= self.cfg.train.max_steps:
            warnings.warn(f"run {self.run_dir} is at step {self.step} and train.max_steps is "
                          f"{self.cfg.train.max_steps}: nothing to train; pass a larger --max-steps to continue it",
                          stacklevel=4)

    def restore(self, found: Path) -> None:
        state = ckpt_io.load_checkpoint(found, self.precond, self.ema, self.optimizer, self.posthoc)
        self.step, self.nimg, self.last_ckpt = int(state["step"]), float(state["nimg"]), found
        self.clock = TrainClock(self.dist.device, float(state.get("train_s", 0.0)))
        if self.heldout is not None:
            self.heldout.restore(state)

    def optimisation_step(self, autocast) -> tuple[torch.Tensor, torch.Tensor, PatchStage, float, float]:
        """One step of the schedule: (this rank's mean loss and the gradient norm, both on the device: reading
        them is a sync, deferred to log time; patch stage, lr, images counted)."""
        tc, oc, dist = self.cfg.train, self.cfg.optim, self.dist
        stage = self.schedule.draw(self.step)
        shape, full_area = self.rows.step_shape(stage, tc.seed, self.step)
        # Images are counted full-size-equivalent: a b-sample batch of ph x pw patches of an H x W
        # latent counts b * ph*pw / (H*W) images, for kimg, images/s and the EMA's half-life.
        batch_nimg = stage.batch_size * shape.height * shape.width / full_area
        lr = oc.lr * min(1.0, (self.step + 1) / max(oc.warmup_steps, 1))  # linear warm-up
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        torch.manual_seed(derive_seed(tc.seed, self.step, dist.rank, "global"))  # anything inside the model
        self.optimizer.zero_grad(set_to_none=True)
        loss = self._accumulate(stage, autocast)  # this rank's; averaged over ranks when read (read_losses)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.precond.parameters(),
                                                   oc.grad_clip if oc.grad_clip > 0 else math.inf)
        self.optimizer.step()
        update_ema(self.ema, self.precond, ema_beta(self.nimg, batch_nimg, tc.ema_halflife_kimg, tc.ema_rampup))
        if self.posthoc is not None:
            self.posthoc.update(self.precond, self.nimg + batch_nimg, batch_nimg)
        self.unchecked.append((self.step, loss.detach(), grad_norm.detach()))
        self.nimg += batch_nimg
        self.step += 1
        return loss, grad_norm, shape, lr, batch_nimg

    def _accumulate(self, stage: PatchStage, autocast) -> torch.Tensor:
        """Forward/backward over train.grad_accum micro-batches; returns this rank's mean loss (detached).

        Each rank's loss is the mean over its slice, so DDP's gradient average over ranks is the global mean.
        """
        accum, dist = self.cfg.train.grad_accum, self.dist
        micro_batch = stage.batch_size // accum
        total = torch.zeros((), device=dist.device)
        for micro in range(accum):
            sync = micro == accum - 1 or not dist.distributed
            with contextlib.nullcontext() if sync else self.model.no_sync():
                b = draw_batch(self.rows, self.batch_spec, stage, micro_batch, self.step, micro, dist.rank,
                               dist.world_size, dist.device)
                with autocast():
                    loss = self.objective.loss(self.model, b.x0, b.coords, b.sigma, b.noise, b.cond,
                                               **b.net_kwargs()).mean()
                (loss * (1.0 / accum)).backward()
            total += loss.detach()
        return total / accum

    def read_losses(self) -> tuple[list[float], float]:
        """The losses of the steps since the last read (one sync) and the last gradient norm; a step whose
        loss or gradient norm is not finite stops the run (the last good checkpoint stays)."""
        if not self.unchecked:
            return [], float("nan")
        steps = [s for s, _, _ in self.unchecked]
        # One all-reduce for the interval: the global mean loss of each step (the gradient norm is the same on
        # every rank, so its mean is itself); every rank sees a non-finite step of any rank.
        values = all_reduce_mean(torch.stack([torch.stack([l.float(), g.float()]) for _, l, g in self.unchecked]),
                                 self.dist).cpu()
        self.unchecked.clear()
        bad = (~torch.isfinite(values).all(1)).nonzero()
        if len(bad):
            i = int(bad[0])
            raise _diverged(f"the loss became {float(values[i, 0])} (gradient norm {float(values[i, 1])})",
                            steps[i], self.last_ckpt)
        return values[:, 0].tolist(), float(values[-1, 1])

    def run(self, progress: bool, callback) -> TrainResult:
        tc, dist = self.cfg.train, self.dist
        autocast = training_autocast(tc.precision, dist.device)
        logger = RunLogger(self.run_dir, enabled=dist.is_main)
        bar = tqdm(total=tc.max_steps, initial=self.step, disable=not (dist.is_main and progress), unit="step")
        interval = LogInterval()
        last_loss, t_start, ok = None, time.perf_counter(), False
        stop = self.heldout is not None and self.heldout.should_stop  # a resumed run that had stopped early
        first_step = self.step
        try:
            if self.heldout is not None and self.step == 0:
                self.evaluate(logger, autocast)  # where the curve starts
            while self.step < tc.max_steps and not stop:
                self.clock.start()
                loss, _, stage, lr, batch_nimg = self.optimisation_step(autocast)
                self.clock.stop()
                interval.add(stage.batch_size, batch_nimg)
                bar.update(1)
                asked = None if callback is None else callback(StepInfo(
                    self.step, self.nimg, loss, (stage.height, stage.width), stage.batch_size, self.clock.seconds,
                    self.precond, self.ema))
                stop = bool(asked) and asked != EVALUATE  # EVALUATE: a held-out evaluation now, not a stop
                final = self.step == tc.max_steps or stop
                best = False
                if self.heldout is not None and (self.step % self.cfg.heldout.every == 0 or final or asked == EVALUATE):
                    best = self.evaluate(logger, autocast) and self.cfg.heldout.keep_best
                    if self.heldout.should_stop and not final:  # patience spent: this checkpoint ends the run
                        stop = final = True
                if self.step % tc.log_every == 0 or final:
                    losses, grad_norm = self.read_losses()
                    record = interval.record(losses, kimg=self.nimg / 1000, train_s=self.clock.seconds, lr=lr,
                                             patch=stage.height, patch_w=stage.width, batch=stage.batch_size,
                                             grad_norm=grad_norm,
                                             **({"zoom": True} if stage.zoom else {}), **memory_stats(dist.device))
                    logger.log(self.step, **record)
                    last_loss = record["loss"]
                    bar.set_postfix(progress_postfix(record, self.heldout))
                if tc.sample_every > 0 and self.step % tc.sample_every == 0 and dist.is_main:
                    self.save_preview(autocast)
                if self.posthoc is not None and (self.step % (tc.posthoc_every or tc.ckpt_every) == 0 or final):
                    self.read_losses()  # not past a non-finite step; before the checkpoint a resume starts from
                    if dist.is_main:
                        self.posthoc.snapshot(snapshot_path(self.run_dir, self.step), self.step, self.nimg)
                if self.step % tc.ckpt_every == 0 or final or best:
                    self.read_losses()  # a checkpoint is never written past an unseen non-finite step
                    self.checkpoint(logger, best=best)
            ok = True
        finally:
            bar.close()
            try:
                logger.plot()
            except UserError:
                if ok:  # else keep the error that stopped the run: a full disk fails the plot too
                    raise
            finally:
                logger.close()
        return self._result(last_loss, time.perf_counter() - t_start, self.step - first_step)

    def _result(self, last_loss, seconds: float, trained: int) -> TrainResult:
        result = TrainResult(self.run_dir, self.step, self.nimg / 1000, self.last_ckpt, last_loss, seconds, trained)
        held = self.heldout
        if held is not None and held.best_step is not None:
            result.best = ckpt_io.best_checkpoint(self.run_dir)
            result.best_loss, result.best_step = held.best_loss, held.best_step
            result.heldout_loss = held.last_loss if held.last_step == self.step else None
            result.stopped_early = held.since_best if held.should_stop and self.step < self.cfg.train.max_steps else 0
        return result

    def evaluate(self, logger: RunLogger, autocast) -> bool:
        """The EMA's held-out loss, logged; True when it is the best so far."""
        with autocast():
            loss, better = self.heldout.evaluate(self.ema, self.step)
        per_bucket = {} if loss.per_bucket is None else {"heldout_per_bucket": loss.per_bucket}
        logger.log(self.step, kimg=self.nimg / 1000, train_s=self.clock.seconds, heldout_loss=loss.mean,
                   heldout_per_sigma=loss.per_sigma, **per_bucket, time=time.time())
        return better

    def save_preview(self, autocast) -> None:
        from latentpatch.autoencoders import load_autoencoder_from_info
        from latentpatch.conditioning.stored import preview_conditioning
        from latentpatch.training.previews import preview_label, save_preview_grid

        tc, edm = self.cfg.train, self.cfg.edm
        if self.autoencoder is None:
            self.autoencoder = load_autoencoder_from_info(self.store.info, device=self.dist.device)
        cond = preview_conditioning(self.spec, self.cond_rows, self.store.captions, tc.sample_n)
        shape = run_latent_shape(self.store)
        with autocast():
            save_preview_grid(self.ema, self.autoencoder, shape,
                              self.run_dir / "samples" / f"step-{self.step:08d}.png", self.dist.device,
                              n=tc.sample_n, steps=tc.sample_steps, sigma_min=edm.sigma_min, sigma_max=edm.sigma_max,
                              cond=cond, label=preview_label(self.step, self.heldout),
                              coordinate_scale=self.cfg.patches.coordinate_scale,
                              sigmas=sampling_sigmas(self.cfg, tc.sample_steps, shape[1:]))

    def checkpoint(self, logger: RunLogger, best: bool = False) -> None:
        """Rank 0 writes; weights that are not finite are never written (the last good checkpoint stays)."""
        if not (_all_finite(self.precond) and _all_finite(self.ema)):
            raise _diverged("the weights are no longer finite", self.step, self.last_ckpt)
        if self.dist.is_main:
            state = {"nimg": self.nimg, "kimg": self.nimg / 1000, "train_s": self.clock.seconds,
                     **trained_shapes(self.store)}
            if self.heldout is not None:
                state.update(self.heldout.state())
            self.last_ckpt = ckpt_io.save_checkpoint(
                self.run_dir, self.step, self.precond, self.ema, self.optimizer, state,
                self.cfg.train.keep_checkpoints, best=best,
                posthoc=None if self.posthoc is None else self.posthoc.state_dict())
            logger.plot(force=False)
        barrier(self.dist)
        if not self.dist.is_main:
            self.last_ckpt = ckpt_io.latest_checkpoint(self.run_dir)


def _diverged(what: str, step: int, last_ckpt: Path | None) -> TrainingDiverged:
    kept = f"the last good checkpoint is {last_ckpt}" if last_ckpt else "no checkpoint was written before it"
    return TrainingDiverged(
        f"training stopped at step {step}: {what}; {kept}. The run is deterministic, so a plain --resume "
        "would diverge again: lower optim.lr, raise optim.warmup_steps or set optim.grad_clip in a new --out"
    )
