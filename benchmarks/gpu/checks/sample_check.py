"""Check 5: the project's sampler (latentpatch.sampling.latents.generate_latents: per-image seeded noise, the full
coordinate grid, guidance wrapper, Heun) against a hand-written Heun loop over the same denoiser and steps.

Both integrate in float64 with the network under bf16 autocast on CUDA (what generate_latents does), draw the
same Karras noise levels, make 2*steps-1 network calls, and decode nothing. Runs alternate; best of each.
"""

from __future__ import annotations

import torch

from latentpatch.diffusion.samplers import karras_sigmas
from latentpatch.patches import full_coordinates
from latentpatch.sampling.latents import generate_latents

from .common import C, Context, Row, clock, ratio_row, sampling_network


@torch.no_grad()
def plain_heun(ctx: Context, precond, n: int, side: int, steps: int, sigma_min: float, sigma_max: float):
    """Karras et al. 2022, Algorithm 2 without churn, written out: Euler step, then the trapezoidal correction."""
    sigmas = karras_sigmas(steps, sigma_min, sigma_max, device=ctx.device).tolist()
    coords = full_coordinates(n, side, side, device=ctx.device)
    x = torch.randn(n, C, side, side, device=ctx.device, dtype=torch.float64) * sigmas[0]
    ones = torch.ones(n, device=ctx.device)

    def d(x, sigma):
        with ctx.autocast():
            denoised = precond(x, sigma * ones, coords).to(torch.float64)
        return (x - denoised) / sigma

    for s0, s1 in zip(sigmas[:-1], sigmas[1:]):
        d0 = d(x, s0)
        x_next = x + (s1 - s0) * d0
        if s1 > 0:
            x_next = x + (s1 - s0) * 0.5 * (d0 + d(x_next, s1))
        x = x_next
    return x.float()


def run(ctx: Context) -> list[Row]:
    s = ctx.sizes
    cfg, precond = sampling_network(ctx, s.dit_b)
    edm, shape = cfg.edm, (C, s.latent, s.latent)

    def ours() -> float:
        t0 = clock(ctx.device)
        generate_latents(precond, list(range(s.sample_n)), shape, steps=s.sample_steps, sigma_min=edm.sigma_min,
                         sigma_max=edm.sigma_max, device=ctx.device, autocast=ctx.bf16).cpu()
        return clock(ctx.device) - t0

    def plain() -> float:
        t0 = clock(ctx.device)
        plain_heun(ctx, precond, s.sample_n, s.latent, s.sample_steps, edm.sigma_min, edm.sigma_max).cpu()
        return clock(ctx.device) - t0

    ours(), plain()  # warm-up
    times = {"ours": [], "plain": []}
    for _ in range(3):
        times["ours"].append(ours())
        times["plain"].append(plain())
    best = {k: min(v) for k, v in times.items()}
    return [ratio_row(f"5 sample/plain Heun, {s.latent}x{s.latent} latents", best["ours"], best["plain"], 1.05,
                      f"{s.sample_n} images, {s.sample_steps} Heun steps, one batch: generate_latents "
                      f"{best['ours']:.3f} s, plain {best['plain']:.3f} s (best of 3)")]
