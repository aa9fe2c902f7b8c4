"""A pretrained DDPM model's own preconditioning (VP), so fine-tuning starts exactly from the pretrained denoiser.

A DDPM network was trained on x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps at discrete timesteps t (a_t: the
scheduler's alphas_cumprod). In EDM's variables (Karras et al. 2022, Sec. 2 and App. C.1) that is
x = x_t / sqrt(a_t) = x0 + sigma eps with sigma_t = sqrt((1 - a_t) / a_t), so the network receives
c_in x = x / sqrt(1 + sigma^2) and its output is read as eps, v or x0 (NVlabs/edm training/networks.py,
VPPrecond and iDDPMPrecond). EDM's loss and samplers then run over D(x; sigma) unchanged.

The timestep for a sigma between two discrete ones is interpolated linearly in ln(sigma), as diffusers'
Euler/Heun/DPM schedulers and k-diffusion do: D stays continuous in sigma (what an ODE solver's steps and
Heun's correction assume), and at the table's own sigmas it is exactly the integer timestep (what iDDPM's
nearest-timestep rounding gives there, so DDPM/DDIM steps are reproduced exactly).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from latentpatch.errors import UserError

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def schedule_sigmas(scheduler: dict[str, Any]) -> Tensor:
    """sigma_t = sqrt((1 - a_t) / a_t) for t = 0..T-1 [T] float32, a_t computed by the base's own diffusers
    scheduler class from its config (betas or beta schedule, num_train_timesteps)."""
    import diffusers

    name = scheduler.get("_class_name") or "DDPMScheduler"
    cls = getattr(diffusers, name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise UserError(f"edm.scheduler names the scheduler class {name!r}, which diffusers does not have")
    try:
        alphas_cumprod = getattr(cls.from_config(scheduler), "alphas_cumprod", None)
    except (ValueError, TypeError, NotImplementedError) as e:
        raise UserError(f"edm.scheduler: diffusers' {name} cannot be built from the config: {e}") from e
    if alphas_cumprod is None:
        raise UserError(f"edm.scheduler: {name} has no DDPM noise schedule (alphas_cumprod); edm.precond=vp serves "
                        "DDPM-style (epsilon / v_prediction / sample) models, not flow-matching ones")
    return vp_sigmas(alphas_cumprod)


def vp_sigmas(alphas_cumprod: Tensor) -> Tensor:
    """sigma = sqrt((1 - a) / a) of a scheduler's alphas_cumprod, in float32 as VPPrecond computes it."""
    a = alphas_cumprod.to(torch.float32).clamp(min=2**-24)  # a zero-terminal-SNR end: EulerDiscrete's convention
    return ((1 - a) / a) ** 0.5


def prediction_type(scheduler: dict[str, Any]) -> str:
    kind = scheduler.get("prediction_type") or "epsilon"
    if kind not in PREDICTION_TYPES:
        raise UserError(f"edm.scheduler.prediction_type {kind!r} is not one of {', '.join(PREDICTION_TYPES)}")
    return kind


def sigma_range(scheduler: dict[str, Any]) -> tuple[float, float]:
    """(sigma at t = 0, sigma at t = T-1): the noise levels the pretrained network was trained on."""
    sigmas = schedule_sigmas(scheduler)
    return float(sigmas[0]), float(sigmas[-1])


def vp_coefficients(sigma: Tensor, kind: str) -> tuple[Tensor, Tensor, Tensor]:
    """c_skip, c_out, c_in of D(x) = c_skip x + c_out F(c_in x) for an eps / v / x0-predicting network.

    eps: x0 = x - sigma eps (EDM Table 1, VP). v (Salimans & Ho 2022) with alpha = 1/sqrt(1+sigma^2),
    s = sigma alpha: v = alpha eps - s x0, so x0 = alpha^2 x - s v. sample: F is x0 itself.
    """
    c_in = 1 / (sigma**2 + 1).sqrt()
    if kind == "epsilon":
        return torch.ones_like(sigma), -sigma, c_in
    if kind == "v_prediction":
        return 1 / (sigma**2 + 1), -sigma * c_in, c_in
    return torch.zeros_like(sigma), torch.ones_like(sigma), c_in


class VPPrecond(nn.Module):
    """D(x; sigma) = c_skip x + c_out F(c_in x, coords; t(sigma)) of a pretrained DDPM network.

    Same call signature and state-dict keys (`net.*`) as EDMPrecond; the coordinate channels are appended
    unscaled, as there. t(sigma) is the interpolated timestep (module docstring), clamped to [0, T-1].
    """

    def __init__(self, net: nn.Module, scheduler: dict[str, Any]):
        super().__init__()
        self.net = net
        self.prediction_type = prediction_type(scheduler)
        log_sigmas = schedule_sigmas(scheduler).log()
        self.register_buffer("log_sigmas", log_sigmas, persistent=False)  # not weights: rebuilt from the config
        self.sigma_min, self.sigma_max = float(log_sigmas[0].exp()), float(log_sigmas[-1].exp())

    def timestep(self, sigma: Tensor) -> Tensor:
        """The (fractional) DDPM timestep of each sigma [B] -> [B] float32 (diffusers' _sigma_to_t)."""
        log_sigmas = self.log_sigmas
        log_sigma = sigma.to(torch.float32).clamp(min=1e-10).log()
        low = (torch.searchsorted(log_sigmas, log_sigma, right=True) - 1).clamp(0, log_sigmas.numel() - 2)
        lo, hi = log_sigmas[low], log_sigmas[low + 1]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return (1 - w) * low + w * (low + 1)

    def forward(self, x: Tensor, sigma: Tensor | float, coords: Tensor, cond=None, *, ddpm: bool = False,
                **net_kwargs) -> Tensor:
        """D(x; sigma); `ddpm=True` makes DDPM's own call instead (the DDPM objective, diffusion/ddpm.py): x is x_t,
        the scheduler's sqrt(a_t) x0 + sqrt(1 - a_t) eps, given to the network as it is, and the network's own
        prediction (eps / v / x0) is returned, float32."""
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        sigma = sigma.expand(x.shape[0], 1, 1, 1)
        if ddpm:
            net_in = torch.cat([x, coords.to(torch.float32)], dim=1)
            return self.net(net_in, self.timestep(sigma.flatten()), cond, **net_kwargs).to(torch.float32)
        c_skip, c_out, c_in = vp_coefficients(sigma, self.prediction_type)
        net_in = torch.cat([c_in * x, coords.to(torch.float32)], dim=1)
        F_x = self.net(net_in, self.timestep(sigma.flatten()), cond, **net_kwargs)
        return c_skip * x + c_out * F_x.to(torch.float32)
