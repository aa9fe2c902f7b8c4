"""EDM preconditioning, training loss and noise levels (Karras et al. 2022, "Elucidating the Design Space").

Follows NVlabs/edm `training/networks.py` EDMPrecond and `training/loss.py` EDMLoss. The one Patch Diffusion
change: the network also sees the patch's coordinate channels, appended after the scaled noisy latent and
left unscaled (they are positions, not signal).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from latentpatch.errors import UserError


PRECONDS = ("edm", "vp", "flow")


@dataclass
class EDMConfig:
    """Noise-level hyper-parameters; the defaults are the paper's (Table 1, "EDM" column)."""

    sigma_data: float | None = None  # std of the training latents; None: the latent store's measured std
    P_mean: float = -1.2  # ln(sigma) ~ N(P_mean, P_std^2) during training
    P_std: float = 1.2
    sigma_min: float = 0.002  # sampling range (with precond "vp" also the range training sigmas are drawn in)
    sigma_max: float = 80.0
    # "edm": Karras et al.'s preconditioning, for models trained here. "vp": a pretrained DDPM network's own
    # (latentpatch.diffusion.vp), "flow": a flow-matching base's (SD3, FLUX.1: latentpatch.diffusion.flow), both
    # read from `scheduler`; fine-tuning a diffusers pipeline writes them.
    precond: str = "edm"
    scheduler: Any = None  # dict: the base's diffusers scheduler_config.json (betas, timesteps, prediction_type)

    def check(self) -> None:
        if (self.sigma_data is not None and not self.sigma_data > 0) or not 0 < self.sigma_min < self.sigma_max \
                or not self.P_std > 0:
            raise UserError(f"edm: need sigma_data > 0, 0 < sigma_min < sigma_max and P_std > 0, got {self}")
        if self.precond not in PRECONDS:
            raise UserError(f"edm.precond must be one of {', '.join(PRECONDS)}, got {self.precond!r}")
        if self.precond == "vp":
            self._check_vp()
        if self.precond == "flow" and not (isinstance(self.scheduler, dict)
                                           and self.scheduler.get("_class_name", "").startswith("FlowMatch")):
            raise UserError("edm.precond=flow needs edm.scheduler: the base's FlowMatchEulerDiscreteScheduler config "
                            "(written by fine-tuning an SD3 or FLUX pipeline)")

    def _check_vp(self) -> None:
        """The scheduler is one diffusers can build, and sampling stays inside its noise levels."""
        from latentpatch.diffusion.vp import prediction_type, sigma_range

        if not isinstance(self.scheduler, dict) or "num_train_timesteps" not in self.scheduler:
            raise UserError("edm.precond=vp needs edm.scheduler: the base's diffusers scheduler config (written by "
                            "fine-tuning a diffusers pipeline)")
        prediction_type(self.scheduler)
        low, high = sigma_range(self.scheduler)
        if not low <= self.sigma_min < self.sigma_max <= high:
            raise UserError(f"edm.sigma_min={self.sigma_min} / edm.sigma_max={self.sigma_max} leave the pretrained "
                            f"schedule's noise levels [{low}, {high}]; set them inside it")


def precond_coefficients(sigma: Tensor, sigma_data: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """c_skip, c_out, c_in, c_noise of Karras et al. 2022, Table 1 (EDM preconditioning), elementwise in sigma."""
    c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
    c_out = sigma * sigma_data / (sigma**2 + sigma_data**2).sqrt()
    c_in = 1 / (sigma**2 + sigma_data**2).sqrt()
    c_noise = sigma.log() / 4
    return c_skip, c_out, c_in, c_noise


def loss_weight(sigma: Tensor, sigma_data: float) -> Tensor:
    """lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2 (Table 1), i.e. 1 / c_out^2."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


class EDMPrecond(nn.Module):
    """D(x; sigma) = c_skip * x + c_out * F(c_in * x, coords; c_noise)  (Karras et al. 2022, eq. 7).

    `net(x[B, C+2, h, w], c_noise[B], cond) -> F[B, C, h, w]` may run under autocast; D is float32.
    """

    def __init__(self, net: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.net = net
        self.sigma_data = float(sigma_data)

    def forward(self, x: Tensor, sigma: Tensor | float, coords: Tensor, cond=None, **net_kwargs) -> Tensor:
        """`net_kwargs` reach the network unchanged (a training step's token route)."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        sigma = sigma.expand(x.shape[0], 1, 1, 1)
        c_skip, c_out, c_in, c_noise = precond_coefficients(sigma, self.sigma_data)
        net_in = torch.cat([c_in * x, coords.to(torch.float32)], dim=1)
        F_x = self.net(net_in, c_noise.flatten(), cond, **net_kwargs)
        return c_skip * x + c_out * F_x.to(torch.float32)


def denoising_loss_at(
    precond: nn.Module, x0: Tensor, coords: Tensor, sigmas: Tensor, noise: Tensor, cond=None,
    *, sigma_data: float, **net_kwargs,
) -> Tensor:
    """Per-sample EDM loss lambda(sigma) * mean_{C,h,w} (D(x0 + sigma*n; sigma) - x0)^2 (Table 1) -> [B].

    Deterministic given `sigmas` [B] and `noise` [B, C, h, w]: the training loss draws them, held-out
    evaluation fixes them.
    """
    sigma = sigmas.to(device=x0.device, dtype=torch.float32).reshape(-1, 1, 1, 1)
    D_yn = precond(x0 + sigma * noise.to(x0), sigma.flatten(), coords, cond, **net_kwargs)
    per_sample = ((D_yn - x0.to(torch.float32)) ** 2).mean(dim=(1, 2, 3))
    return loss_weight(sigma.flatten(), sigma_data) * per_sample


@dataclass(frozen=True)
class EDMObjective:
    """The training objective of models trained here and of the VP bases: noise levels from `training_sigmas`,
    the loss `denoising_loss_at`. The trainer asks an objective only these two things, so a base with another
    objective (flow matching) brings its own."""

    cfg: EDMConfig

    def draw_sigmas(self, n: int, generator: torch.Generator, device=None, full_shapes: Tensor | None = None) -> Tensor:
        """n noise levels; EDM's do not depend on the images' full latent shapes `full_shapes` [n, 2]."""
        return training_sigmas(n, self.cfg, generator, device)

    def loss(self, precond: nn.Module, x0: Tensor, coords: Tensor, sigma: Tensor, noise: Tensor, cond=None,
             **net_kwargs) -> Tensor:
        return denoising_loss_at(precond, x0, coords, sigma, noise, cond, sigma_data=self.cfg.sigma_data, **net_kwargs)


def training_sigmas(n: int, cfg: EDMConfig, generator: torch.Generator | None = None, device=None) -> Tensor:
    """n training noise levels, ln(sigma) ~ N(P_mean, P_std^2) (Karras et al. 2022, Table 1) -> [n] float32.

    With precond "vp" the normal is truncated to [sigma_min, sigma_max], a pretrained schedule's range: the same
    draws are mapped through its CDF, z -> Phi^-1(Phi(a) + (Phi(b) - Phi(a)) Phi(z)), so it costs no extra draws.
    """
    rnd_normal = torch.randn([n], generator=generator, device=device)
    if cfg.precond == "vp":
        rnd_normal = _truncated(rnd_normal, cfg)
    return (rnd_normal * cfg.P_std + cfg.P_mean).exp()


def _truncated(z: Tensor, cfg: EDMConfig) -> Tensor:
    """N(0, 1) draws mapped to N(0, 1) truncated so that exp(z P_std + P_mean) lies in [sigma_min, sigma_max]."""
    ends = torch.tensor([math.log(cfg.sigma_min), math.log(cfg.sigma_max)], dtype=torch.float64, device=z.device)
    lo, hi = torch.special.ndtr((ends - cfg.P_mean) / cfg.P_std)
    u = lo + (hi - lo) * torch.special.ndtr(z.to(torch.float64))
    bounds = ((ends - cfg.P_mean) / cfg.P_std).to(z.dtype)
    return torch.special.ndtri(u).to(z.dtype).clamp(bounds[0], bounds[1])  # clamp: float rounding at the ends


def heldout_sigma_grid(n: int = 8, P_mean: float = -1.2, P_std: float = 1.2) -> Tensor:
    """n noise levels at the mid-quantiles (k + 1/2)/n of the training log-normal, ascending, float32.

    A fixed grid makes held-out losses comparable between checkpoints and runs.
    """
    if n < 1:
        raise ValueError(f"heldout_sigma_grid needs n >= 1, got {n}")
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n
    return (P_mean + P_std * torch.special.ndtri(q)).exp().to(torch.float32)


def fixed_noise(shape: tuple[int, ...] | torch.Size, seed: int, *, device=None, dtype=torch.float32) -> Tensor:
    """N(0, I) noise drawn on the CPU from `seed`, so it is the same on every device and machine."""
    gen = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn(tuple(shape), generator=gen).to(device=device, dtype=dtype)


__all__ = [
    "EDMConfig",
    "EDMObjective",
    "EDMPrecond",
    "denoising_loss_at",
    "fixed_noise",
    "heldout_sigma_grid",
    "loss_weight",
    "precond_coefficients",
    "training_sigmas",
]
