"""Check 6: xFormers against PyTorch SDPA, one training step (forward, backward) of the DiT and of the UNet.

The backend is the config's model.attention, resolved once when the network is built
(latentpatch.models.attention); where xFormers' kernels do not load the row says why and gives SDPA's time.
"""

from __future__ import annotations

import torch

import latentpatch as lp
from latentpatch.denoiser import build_precond
from latentpatch.diffusion.edm import denoising_loss_at

from .common import C, Context, Row, clock, median

STEPS = 5


def step_time(ctx: Context, overrides: list[str], backend: str) -> float:
    """Median seconds of a forward + backward at the full latent size, after two warm-up steps."""
    s = ctx.sizes
    cfg = lp.load_config(None, overrides + [f"model.attention={backend}", "edm.sigma_data=1.0"])
    torch.manual_seed(0)
    model = build_precond(cfg, C, device=ctx.device).to(ctx.device).train()
    g = torch.Generator().manual_seed(0)
    b, side = s.attention_batch, s.latent
    x0, noise = (torch.randn(b, C, side, side, generator=g).to(ctx.device) for _ in range(2))
    coords = torch.zeros(b, 2, side, side, device=ctx.device)
    sigma = torch.full((b,), 1.0, device=ctx.device)
    times = []
    for i in range(STEPS + 2):
        t0 = clock(ctx.device)
        with ctx.autocast():
            loss = denoising_loss_at(model, x0, coords, sigma, noise, sigma_data=1.0).mean()
        loss.backward()
        model.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(clock(ctx.device) - t0)
    return median(times)


def run(ctx: Context) -> list[Row]:
    s = ctx.sizes
    rows = []
    for name, overrides in (("DiT-B/2" if not ctx.smoke else "tiny DiT", s.dit_b), ("UNet", s.unet)):
        sdpa = step_time(ctx, overrides, "sdpa")
        where = f"{name}, {s.latent}x{s.latent} x{s.attention_batch}, forward+backward"
        try:
            xformers = step_time(ctx, overrides, "xformers")
        except lp.UserError as e:  # no CUDA, no wheel for this PyTorch, or a build without kernels
            rows.append(Row(f"6 xformers/SDPA step, {name}", None, "x", "report", None,
                            f"not available: {str(e)[:160]}; SDPA {sdpa:.4f} s ({where})"))
            continue
        rows.append(Row(f"6 xformers/SDPA step, {name}", round(xformers / sdpa, 4), "x", "report (< 1: xformers "
                        "faster)", None, f"xformers {xformers:.4f} s, SDPA {sdpa:.4f} s ({where})"))
    return rows
