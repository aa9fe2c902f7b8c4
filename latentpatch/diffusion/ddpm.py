"""The DDPM objective of a VP base as diffusers' training examples train it (vp.objective=ddpm; SDXL's default).

examples/text_to_image/train_text_to_image_sdxl.py (and train_text_to_image.py for SD 1.x/2.x) draw a timestep
t uniformly from 0..T-1 per sample, form x_t = noise_scheduler.add_noise(x0, eps, t) with the base's
DDPMScheduler, call the network on (x_t, t) and take the mean squared error of its output against its own
target: eps, the velocity noise_scheduler.get_velocity(x0, eps, t), or x0; `--snr_gamma` weights each sample by
min(SNR, gamma) / SNR (Min-SNR, Hang et al. 2023; SNR + 1 for v-prediction, as the SDXL example does). That is
DDPM's simple loss (Ho et al. 2020, eq. 14), not EDM's lambda(sigma) weighting.

A timestep travels through the trainer as the sigma of VPPrecond's table (diffusion/vp.py) at that index, and
is read back exactly (the table is strictly increasing). The network sees x_t itself, formed as the example
forms it, through VPPrecond's `ddpm=True` call. Zero terminal SNR (`rescale_betas_zero_snr`) is exact here:
DDPMScheduler's a_{T-1} = 0 gives x_t = eps and the v target -x0 at the last timestep, as in the example; only
the sigma that stands for t = T-1 is finite (EulerDiscreteScheduler's a = 2^-24 convention, which sampling uses).

What is not here: the example's `--noise_offset` and `--timestep_bias_*` options; for `sample` prediction the
example subtracts the noise from the prediction, here the prediction is compared with x0 as the scheduler reads
it. The held-out loss stays latentpatch's (EDM's weighting of the x0 error), scored at the mid-quantiles of the
uniform timesteps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from latentpatch.errors import UserError

OBJECTIVES = ("edm", "ddpm")


@dataclass
class VPConfig:
    """How a VP base (edm.precond=vp) is trained: EDM's loss over its own preconditioning, or DDPM's."""

    # "edm": EDM's loss and log-normal noise levels truncated to the schedule (SD 1.x/2.x and DiT fine-tunes);
    # "ddpm": diffusers' training examples' uniform timesteps and MSE on the network's own prediction (SDXL).
    objective: str = "edm"
    snr_gamma: float | None = None  # with "ddpm": Min-SNR weighting, the examples' --snr_gamma (5.0 recommended)

    def check(self) -> None:
        if self.objective not in OBJECTIVES:
            raise UserError(f"vp.objective must be one of {', '.join(OBJECTIVES)}, got {self.objective!r}")
        if self.snr_gamma is not None and not self.snr_gamma > 0:
            raise UserError(f"vp.snr_gamma must be > 0 (or null for no weighting), got {self.snr_gamma}")
        if self.snr_gamma is not None and self.objective != "ddpm":
            raise UserError("vp.snr_gamma weights the DDPM loss; set vp.objective=ddpm or drop it")


class DDPMObjective:
    """Training noise levels (uniform timesteps), the examples' per-sample loss and a held-out grid."""

    def __init__(self, cfg: VPConfig, scheduler: dict[str, Any]) -> None:
        from diffusers import DDPMScheduler

        from latentpatch.diffusion.vp import prediction_type, schedule_sigmas

        cfg.check()
        self.cfg = cfg
        self.prediction_type = prediction_type(scheduler)
        self.table = schedule_sigmas(scheduler)  # [T] float32, strictly increasing: sigma of each timestep
        config = {k: v for k, v in scheduler.items() if not k.startswith("_")}
        self.noise_scheduler = DDPMScheduler.from_config(config)  # the examples' noise_scheduler
        self.num_train_timesteps = int(self.noise_scheduler.config.num_train_timesteps)
        if not bool((self.table[1:] > self.table[:-1]).all()):
            raise UserError("edm.scheduler's noise levels are not strictly increasing in the timestep; the DDPM "
                            "objective cannot carry a timestep as its sigma")
        zero_snr = float(self.noise_scheduler.alphas_cumprod[-1]) == 0.0
        if zero_snr and cfg.snr_gamma is not None and self.prediction_type == "epsilon":
            raise UserError("vp.snr_gamma with an epsilon model of zero terminal SNR divides by an SNR of 0 at the last "
                            "timestep; drop vp.snr_gamma")

    def timesteps(self, sigma: Tensor) -> Tensor:
        """The integer timestep [n] of each training sigma [n] (a value of the table)."""
        table = self.table.to(sigma.device)
        t = torch.searchsorted(table, sigma.to(torch.float32)).clamp(max=len(table) - 1)
        if not torch.equal(table[t], sigma.to(torch.float32)):
            raise ValueError("the DDPM objective's sigmas must be its table's (drawn by draw_sigmas)")
        return t

    def draw_sigmas(self, n: int, generator: torch.Generator | None = None, device=None,
                    full_shapes: Tensor | None = None) -> Tensor:
        """n noise levels [n] float32: the table at t ~ U{0, ..., T-1}, drawn as the examples draw them (torch.randint);
        they do not depend on the images' full shapes."""
        draw_device = generator.device if generator is not None else (device or "cpu")
        t = torch.randint(0, self.num_train_timesteps, (n,), generator=generator, device=draw_device)
        return self.table.to(draw_device)[t].to(device or draw_device)

    def heldout_sigmas(self, n: int = 8, full_shape: tuple[int, int] | None = None) -> Tensor:
        """n noise levels [n] ascending: the table at the mid-quantiles (k + 1/2)/n of the uniform timesteps."""
        if n < 1:
            raise ValueError(f"heldout_sigmas needs n >= 1, got {n}")
        t = ((torch.arange(n, dtype=torch.float64) + 0.5) / n * self.num_train_timesteps).long()
        return self.table[t]

    def target(self, x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        if self.prediction_type == "epsilon":
            return noise
        if self.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(x0, noise, t)
        return x0

    def weighting(self, t: Tensor) -> Tensor | None:
        """Min-SNR's min(SNR, gamma) / SNR per sample (SNR + 1 for v-prediction), or None without vp.snr_gamma."""
        if self.cfg.snr_gamma is None:
            return None
        from diffusers.training_utils import compute_snr

        snr = compute_snr(self.noise_scheduler, t)
        if self.prediction_type == "v_prediction":
            snr = snr + 1
        return torch.stack([snr, self.cfg.snr_gamma * torch.ones_like(t)], dim=1).min(dim=1)[0] / snr

    def loss(self, precond: nn.Module, x0: Tensor, coords: Tensor, sigma: Tensor, noise: Tensor, cond=None,
             **net_kwargs) -> Tensor:
        """Per-sample loss [n]: mean((pred - target)^2) (times the Min-SNR weight), deterministic given `sigma` [n]
        (the drawn timesteps) and `noise`; `precond` is a VPPrecond (or a wrapper of one: DDP, compile), called once."""
        t = self.timesteps(sigma.to(x0.device))
        noise = noise.to(x0)
        x_t = self.noise_scheduler.add_noise(x0, noise, t)
        pred = precond(x_t, sigma, coords, cond, ddpm=True, **net_kwargs)
        per_sample = ((pred.float() - self.target(x0, noise, t).float()) ** 2).mean(dim=(1, 2, 3))
        weight = self.weighting(t)
        return per_sample if weight is None else per_sample * weight.to(per_sample)


__all__ = ["DDPMObjective", "OBJECTIVES", "VPConfig"]
