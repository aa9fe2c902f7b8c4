"""Samplers over a denoiser D(x; sigma), k-diffusion style: plain functions with one signature.

    sample_x(denoise, x, sigmas, *, noise_fn=None, churn=0.0, s_tmin=0.0, s_tmax=inf, s_noise=1.0,
             callback=None, progress=False) -> x0

`denoise(x, sigma[B]) -> D(x)`; `sigmas` is 1-D and decreasing (usually `karras_sigmas`, ending in 0);
`x` starts as noise * sigmas[0]. Integration runs in x's dtype (pass float64 for the paper's precision).
`noise_fn(like) -> fresh N(0, I)` supplies every extra draw, so per-image generators (`per_image_noise_fn`)
give each image the same result whatever batch it is sampled in.

Why not diffusers' EDMDPMSolverMultistepScheduler / EDMEulerScheduler: they compute their own Karras
schedule in `set_timesteps` (no custom sigmas), apply their own c_skip/c_out to a raw network output
(there is no "sample"/D(x) prediction type, so our D(x) would have to be inverted through 1/c_out), start
from sqrt(sigma_max^2 + 1) rather than sigma_max, and draw churn noise from one batch generator. The 2M
update below is the same formula; tests/test_samplers.py checks it matches the diffusers scheduler.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import trange

from latentpatch.diffusion.edm import EDMConfig
from latentpatch.errors import UserError

KARRAS_RHO = 7.0  # Karras et al. 2022, eq. 5 and Table 1
Denoiser = Callable[[Tensor, Tensor], Tensor]
NoiseFn = Callable[[Tensor], Tensor]


def karras_sigmas(
    n: int, sigma_min: float = EDMConfig.sigma_min, sigma_max: float = EDMConfig.sigma_max,
    rho: float = KARRAS_RHO, *, device=None
) -> Tensor:
    """n noise levels of Karras et al. 2022 eq. 5 (sigma_max first, sigma_min last) with 0 appended -> [n+1] float64."""
    if n < 1:
        raise UserError(f"the number of sampling steps must be at least 1, got {n}")
    if not 0 < sigma_min < sigma_max:
        raise UserError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    ramp = torch.linspace(0, 1, n, dtype=torch.float64, device=device)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    sigmas = (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def per_image_noise_fn(seeds: list[int], device=None) -> NoiseFn:
    """A noise_fn whose row b comes from its own generator seeded with seeds[b] (like EDM's StackedRandomGenerator).

    Draw the starting noise with it too: `x = noise_fn(torch.empty(shape)) * sigmas[0]`.
    """
    device = torch.device(device if device is not None else "cpu")
    generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds]

    def noise_fn(like: Tensor) -> Tensor:
        if like.shape[0] != len(generators):
            raise ValueError(f"noise_fn has {len(generators)} seeds but was asked for a batch of {like.shape[0]}")
        rows = [torch.randn(like.shape[1:], generator=g, device=device, dtype=torch.float32) for g in generators]
        return torch.stack(rows).to(device=like.device, dtype=like.dtype)

    return noise_fn


def _to_d(x: Tensor, sigma: Tensor, denoised: Tensor) -> Tensor:
    """dx/dsigma = (x - D(x; sigma)) / sigma, the probability-flow ODE (Karras et al. 2022, eq. 3 with s=1, sigma=t)."""
    return (x - denoised) / sigma


def _churn_step(x, sigma, churn, n_steps, s_tmin, s_tmax, s_noise, noise_fn):
    """Algorithm 2 lines 4-6: raise the noise level to sigma_hat = (1 + gamma) sigma by adding fresh noise."""
    gamma = min(churn / n_steps, math.sqrt(2) - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (1 + gamma)
    if gamma > 0:
        x = x + math.sqrt(sigma_hat**2 - sigma**2) * s_noise * noise_fn(x)
    return x, sigma_hat


def _prepare(x: Tensor, sigmas: Tensor, noise_fn: NoiseFn | None):
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be 1-D with at least 2 levels, got shape {tuple(sigmas.shape)}")
    return sigmas.tolist(), x.new_ones([x.shape[0]]), noise_fn or torch.randn_like


def _denoise(denoise: Denoiser, x: Tensor, sigma: float, s_in: Tensor) -> Tensor:
    return denoise(x, sigma * s_in).to(x.dtype)


def _edm_steps(denoise: Denoiser, x: Tensor, sigmas: Tensor, noise_fn: NoiseFn | None, churn: float,
               s_tmin: float, s_tmax: float, s_noise: float, callback, progress: bool, heun: bool) -> Tensor:
    """Karras et al. 2022, Algorithm 2: churn, an Euler step, and (heun) the trapezoidal correction."""
    sig, s_in, noise_fn = _prepare(x, sigmas, noise_fn)
    n_steps = len(sig) - 1
    for i in trange(n_steps, disable=not progress):
        x_hat, t_hat = _churn_step(x, sig[i], churn, n_steps, s_tmin, s_tmax, s_noise, noise_fn)
        denoised = _denoise(denoise, x_hat, t_hat, s_in)
        if callback is not None:
            callback({"x": x_hat, "i": i, "sigma": sig[i], "sigma_hat": t_hat, "denoised": denoised})
        d_cur = _to_d(x_hat, t_hat, denoised)
        x = x_hat + (sig[i + 1] - t_hat) * d_cur
        if heun and sig[i + 1] > 0:  # Algorithm 2 lines 9-11: trapezoidal correction
            d_prime = _to_d(x, sig[i + 1], _denoise(denoise, x, sig[i + 1], s_in))
            x = x_hat + (sig[i + 1] - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x


@torch.no_grad()
def sample_heun(denoise: Denoiser, x: Tensor, sigmas: Tensor, *, noise_fn: NoiseFn | None = None,
                churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
                callback=None, progress: bool = False) -> Tensor:
    """EDM's 2nd-order Heun sampler with optional churn (Karras et al. 2022, Algorithm 2); Euler into sigma = 0."""
    return _edm_steps(denoise, x, sigmas, noise_fn, churn, s_tmin, s_tmax, s_noise, callback, progress, heun=True)


@torch.no_grad()
def sample_euler(denoise: Denoiser, x: Tensor, sigmas: Tensor, *, noise_fn: NoiseFn | None = None,
                 churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
                 callback=None, progress: bool = False) -> Tensor:
    """1st-order Euler on the probability-flow ODE (Algorithm 2 without the correction), same churn."""
    return _edm_steps(denoise, x, sigmas, noise_fn, churn, s_tmin, s_tmax, s_noise, callback, progress, heun=False)


@torch.no_grad()
def sample_dpmpp_2m(denoise: Denoiser, x: Tensor, sigmas: Tensor, *, noise_fn: NoiseFn | None = None,
                    churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
                    callback=None, progress: bool = False) -> Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Alg. 2) with alpha = 1, lambda = -ln(sigma).

    Deterministic multistep: the churn keywords exist for the shared signature; churn > 0 is refused
    because fresh noise would invalidate the previous step's D(x) that the 2nd-order term reuses.
    """
    if churn > 0:
        raise UserError("the dpmpp_2m sampler is deterministic; use churn with the heun or euler sampler")
    sig, s_in, _ = _prepare(x, sigmas, noise_fn)
    old_denoised = None
    for i in trange(len(sig) - 1, disable=not progress):
        denoised = _denoise(denoise, x, sig[i], s_in)
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sig[i], "sigma_hat": sig[i], "denoised": denoised})
        if sig[i + 1] == 0:  # lambda = +inf: the exponential integrator lands exactly on D(x)
            x = denoised
        else:
            h = math.log(sig[i] / sig[i + 1])  # lambda_{i+1} - lambda_i
            if old_denoised is None:
                D = denoised  # first step: 1st order (DPM-Solver++(1) = DDIM)
            else:
                r = math.log(sig[i - 1] / sig[i]) / h  # h_{i-1} / h_i
                D = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sig[i + 1] / sig[i]) * x - math.expm1(-h) * D
        old_denoised = denoised
    return x


SAMPLERS: dict[str, Callable[..., Tensor]] = {
    "heun": sample_heun,
    "euler": sample_euler,
    "dpmpp_2m": sample_dpmpp_2m,
}


def get_sampler(name: str) -> Callable[..., Tensor]:
    """The sampler function registered under `name`."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise UserError(f"unknown sampler {name!r}; valid samplers: {', '.join(sorted(SAMPLERS))}") from None
