"""The training sections of the config: optimiser, loop, held-out evaluation and token routing.

They sit in the core beside config.py (not in the training stage) so that the config never imports a stage."""

from __future__ import annotations

from dataclasses import dataclass, field

from latentpatch.errors import UserError

PRECISIONS = ("auto", "bf16", "fp32")
# A post-hoc EMA profile's relative std (training/posthoc_ema.py): sigma_rel peaks at 0.30 (gamma -0.38); up to
# 0.28, gamma >= 0.17, so every profile weights later moments more.
MAX_POSTHOC_STD = 0.28


def check_std(sigma_rel: float, key: str = "sigma_rel") -> float:
    """A relative EMA std in (0, MAX_POSTHOC_STD], else a one-line UserError naming `key`."""
    if not 0 < float(sigma_rel) <= MAX_POSTHOC_STD:
        raise UserError(f"{key} must be in (0, {MAX_POSTHOC_STD}] (a relative EMA std; EDM2's good values are "
                        f"0.05-0.15), got {sigma_rel}")
    return float(sigma_rel)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8
    warmup_steps: int = 1000
    grad_clip: float = 1.0

    def check(self) -> None:
        if len(self.betas) != 2:
            raise UserError(f"optim.betas needs two values, got {self.betas}")
        if not self.lr >= 0:
            raise UserError(f"optim.lr must be >= 0, got {self.lr}")


@dataclass
class TrainConfig:
    batch_size: int = 64  # per optimisation step at full size, over all ranks
    grad_accum: int = 1
    max_steps: int = 100_000
    seed: int = 0
    precision: str = "auto"  # "auto" (bf16 on CUDA, fp32 on CPU) | "bf16" | "fp32"
    compile: bool = False
    ema_halflife_kimg: float = 500.0
    ema_rampup: float | None = 0.05
    label_dropout: float = 0.1
    log_every: int = 50
    ckpt_every: int = 1000
    keep_checkpoints: int = 3
    sample_every: int = 0
    sample_n: int = 16
    sample_steps: int = 18
    # On CUDA the store's rows move to the GPU when they fit in this share of its free memory; else they stay
    # memory-mapped on the host and each step copies its rows over (pinned, asynchronous).
    data_device_share: float = 0.25
    # Early stopping: held-out evaluations without a new best before the run stops (0: never; null: 10 on a
    # small store, where held-out evaluation is on by default, else 0; see training/guard.py).
    patience: int | None = None
    # Post-hoc EMA (EDM2; training/posthoc_ema.py): power-function EMA profiles of these relative stds, sorted,
    # each in (0, 0.28] (empty: none), snapshotted every `posthoc_every` steps (null: ckpt_every) into
    # RUN/posthoc/snapshots/, from which `latentpatch ema` reconstructs the EMA of any other std.
    posthoc_stds: list[float] = field(default_factory=list)
    posthoc_every: int | None = None

    def check(self) -> None:
        """Values no type check catches; each message names the key."""
        for key in ("batch_size", "grad_accum", "log_every", "ckpt_every", "max_steps"):
            if getattr(self, key) < 1:
                raise UserError(f"train.{key} must be at least 1, got {getattr(self, key)}")
        if self.patience is not None and self.patience < 0:
            raise UserError(f"train.patience must be >= 0 (0: no early stopping), got {self.patience}")
        if not 0.0 <= self.label_dropout <= 1.0:
            raise UserError(f"train.label_dropout must be in [0, 1], got {self.label_dropout}")
        if self.precision not in PRECISIONS:
            raise UserError(f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")
        for std in self.posthoc_stds:
            check_std(std, "train.posthoc_stds")
        if self.posthoc_stds != sorted(set(self.posthoc_stds)) or any(round(s, 3) != s for s in self.posthoc_stds):
            raise UserError(f"train.posthoc_stds must be sorted, without repeats, at most 3 decimals (each names its "
                            f"profile, e.g. std0.050), got {self.posthoc_stds}")
        if self.posthoc_every is not None and self.posthoc_every < 1:
            raise UserError(f"train.posthoc_every must be at least 1 (null: ckpt_every), got {self.posthoc_every}")


@dataclass
class HeldoutConfig:
    """Held-out evaluation during training: the EMA's EDM-weighted denoising loss on latents it never trains
    on, at fixed noise levels with fixed noise, every `every` steps; the best checkpoint is kept.

    `share` and `every` left null are chosen at the start of a run (training/guard.py): on a small store a
    share of its source images and a few dozen evaluations, on a large one none; the choice is written into
    the run's config.yaml, so a resume keeps it."""

    latents: str | None = None  # a held-out latent store (the training store's autoencoder and latent shape)
    share: float | None = None  # or hold out this share of the training store's source images (a flip goes with it)
    every: int | None = None  # optimisation steps between evaluations (0: no held-out evaluation)
    sigmas: int = 8  # noise levels: the mid-quantiles of the training log-normal (edm.heldout_sigma_grid)
    limit: int = 256  # at most this many held-out images
    seed: int = 0  # the fixed noise
    keep_best: bool = True  # keep the best checkpoint (what `sample` loads by default)

    def check(self) -> None:
        if self.share is not None and not 0.0 <= self.share < 1.0:
            raise UserError(f"heldout.share must be in [0, 1), got {self.share}")
        if self.latents and self.share:
            raise UserError("give heldout.latents or heldout.share, not both")
        if (self.every or 0) < 0 or self.sigmas < 1 or self.limit < 1:
            raise UserError("heldout.every must be >= 0, heldout.sigmas and heldout.limit >= 1")
        if self.every and not self.latents and self.share == 0:
            raise UserError(f"heldout.every={self.every} needs held-out latents: set heldout.latents (a latent store) "
                            "or heldout.share (a share of the training store)")

    @property
    def enabled(self) -> bool:
        return bool(self.every)


@dataclass
class RoutingConfig:
    """TREAD token routing (Krause et al. 2025) in the DiT, training only: a random `share` of each sample's
    tokens skips blocks start..end (inclusive; negative counts from the last block) and rejoins unchanged;
    no new parameters, and sampling uses every token."""

    share: float = 0.0  # 0: no routing
    start: int = 1
    end: int = -2

    def check(self) -> None:
        if not 0.0 <= self.share < 1.0:
            raise UserError(f"routing.share must be in [0, 1), got {self.share}")

    def blocks(self, depth: int) -> tuple[int, int]:
        """The first and last routed block of a `depth`-block DiT."""
        start, end = self.start % depth, self.end % depth
        if not (0 <= self.start < depth and -depth <= self.end < depth) or start > end:
            raise UserError(f"routing.start={self.start} and routing.end={self.end} do not name blocks of a "
                            f"{depth}-block DiT in order (0..{depth - 1}, or negative from the last)")
        return start, end
