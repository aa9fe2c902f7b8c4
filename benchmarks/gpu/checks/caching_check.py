"""Check 12: the sampling caches on the GPU (issue 35): the sampler's images/s with `--cache` over the uncached
sampler's, for a random DiT-B/2 (the step cache at intervals 3 and 4) and the small UNet (DeepCache at intervals
3 and 5), at the suite's latent size.

The CPU measured these on small trained runs (docs/benchmarks.md, "Sampling caches"); on a GPU a cached call of
a network this size may be bound by kernel launches rather than arithmetic, so a cache can save less. Each arm
samples the same batch (Heun, the suite's steps, unconditional, so the speed does not depend on the weights)
through `job_cache`, as `lp.sample` does; rounds alternate the arms, the first untimed; best of the rest,
synchronised time. The decode is left out: the CPU tables report it apart.
"""

from __future__ import annotations

import torch

from latentpatch.sampling.caches import job_cache
from latentpatch.sampling.latents import generate_latents

from .common import C, Context, Row, clock, sampling_network

ROUNDS = 3  # timed, after one untimed round
NETWORKS = {  # the suite's network -> (the Sizes field of its config overrides, {arm: --cache})
    "DiT-B/2": ("dit_b", {"step i3": "step:interval=3,order=1,warmup=3", "step i4": "step:interval=4,order=1,warmup=3"}),
    "UNet": ("unet", {"deepcache i3": "deepcache:interval=3,level=0,warmup=1",
                      "deepcache i5": "deepcache:interval=5,level=0,warmup=1"}),
}
ROWS = [f"12 cache {net} {arm}" for net, (_, arms) in NETWORKS.items() for arm in arms]


def _seconds(ctx: Context, precond, edm, cache: str | None) -> float:
    """One batch through the sampler with `cache` installed (None: uncached), synchronised wall seconds; `edm`
    the config's noise range."""
    s = ctx.sizes
    with job_cache(precond, cache) as installed:
        denoiser = installed.fresh()
        t0 = clock(ctx.device)
        generate_latents(denoiser, list(range(s.sample_n)), (C, s.latent, s.latent), steps=s.sample_steps,
                         sigma_min=edm.sigma_min, sigma_max=edm.sigma_max, device=ctx.device, autocast=ctx.bf16)
        return clock(ctx.device) - t0


@torch.no_grad()
def run(ctx: Context) -> list[Row]:
    s, rows = ctx.sizes, []
    for net, (field, arms) in NETWORKS.items():
        cfg, precond = sampling_network(ctx, getattr(s, field))
        caches = {"uncached": None} | arms
        times: dict[str, list[float]] = {arm: [] for arm in caches}
        for r in range(ROUNDS + 1):
            for arm, cache in caches.items():
                seconds = _seconds(ctx, precond, cfg.edm, cache)
                if r:
                    times[arm].append(seconds)
        best = {arm: min(t) for arm, t in times.items()}
        for arm in arms:
            speedup = best["uncached"] / best[arm]
            rows.append(Row(f"12 cache {net} {arm}", round(speedup, 4), "x", ">= 2x (issue 35's aim)",
                            bool(speedup >= 2), f"{arms[arm]}: {best[arm]:.3f} s vs uncached {best['uncached']:.3f} s "
                            f"for {s.sample_n} images, {s.sample_steps} Heun steps, {s.latent}x{s.latent} latents "
                            f"(best of {ROUNDS}, sampler alone)"))
        del precond
    return rows
