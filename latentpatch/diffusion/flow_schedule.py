"""The noise levels of a flow-matching base (SD3, FLUX.1), read from its own FlowMatchEulerDiscreteScheduler, in
EDM's sigma = t / (1 - t) (latentpatch.diffusion.flow): the training table with its shift, FLUX's
resolution-dependent shift from the full image's token count, and the pipelines' sampling schedules.

Flow time t = 1 (pure noise, where both pipelines start) is sigma = infinity; it is stood for by
SIGMA_AT_T1 = 2^30, which maps back to t = 1 exactly in float32 (the network sees timestep 1000 and x_t equal
to the noise it was started from, bit for bit), and to within 1e-9 of it in float64.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from latentpatch.errors import UserError

SIGMA_AT_T1 = 2.0**30
PIPELINES = ("StableDiffusion3Pipeline", "FluxPipeline")


def edm_sigma(t: Tensor) -> Tensor:
    """EDM sigma = t / (1 - t) of flow times t -> float64; t = 1 gives SIGMA_AT_T1, and sigma 0 stays 0."""
    t = torch.as_tensor(t).to(torch.float64)
    return torch.where(t >= 1, torch.full_like(t, SIGMA_AT_T1), t / (1 - t).clamp(min=1 / SIGMA_AT_T1))


def flow_time(sigma: Tensor) -> Tensor:
    """t = sigma / (1 + sigma), the inverse of edm_sigma (float64 in, float64 out)."""
    return sigma / (1 + sigma)


def flow_scheduler(config: dict[str, Any]) -> Any:
    """The base's FlowMatchEulerDiscreteScheduler from its scheduler_config.json."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    name = config.get("_class_name", "FlowMatchEulerDiscreteScheduler")
    if name != "FlowMatchEulerDiscreteScheduler":
        raise UserError(f"the base's scheduler is a {name}; a flow-matching base (SD3, FLUX.1) has a "
                        "FlowMatchEulerDiscreteScheduler")
    return FlowMatchEulerDiscreteScheduler.from_config(config)


def image_tokens(full_shapes: Tensor, patch: int = 2) -> Tensor:
    """[n] tokens of each full latent [n, 2] (h, w): (h // p) * (w // p), the pipelines' image_seq_len."""
    full_shapes = torch.as_tensor(full_shapes).reshape(-1, 2).long()
    return (full_shapes[:, 0] // patch) * (full_shapes[:, 1] // patch)


def resolution_mu(scheduler: Any, tokens: int, pipeline: str = "FluxPipeline") -> float:
    """FLUX's shift mu for an image of `tokens` tokens: the pipeline's calculate_shift with the scheduler config's
    base/max_image_seq_len and base/max_shift (the pipelines' own fallbacks where the config has none)."""
    module = _pipeline_module(pipeline)
    cfg = scheduler.config
    max_shift = 1.15 if pipeline == "FluxPipeline" else 1.16
    return module.calculate_shift(int(tokens), cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                  cfg.get("base_shift", 0.5), cfg.get("max_shift", max_shift))


def shifted_table_levels(scheduler: Any, t: Tensor, full_shapes: Tensor | None, patch: int = 2) -> Tensor:
    """Flow times t [n] from the scheduler's training table, moved by the resolution-dependent shift of each
    sample's full image (scheduler.time_shift with mu from its token count) when the scheduler shifts
    dynamically; otherwise t itself (the table already carries the fixed `shift`)."""
    if not scheduler.config.use_dynamic_shifting:
        return t
    if full_shapes is None:
        raise UserError("this base shifts its noise levels by the image's token count (use_dynamic_shifting): "
                        "give each sample's full latent shape")
    tokens = image_tokens(full_shapes, patch).to(t.device)
    out = torch.empty_like(t)
    for count in tokens.unique().tolist():
        at = tokens == count
        out[at] = scheduler.time_shift(resolution_mu(scheduler, count), 1.0, t[at]).to(t.dtype)
    return out


def pipeline_sigmas(scheduler_config: dict[str, Any], steps: int, latent_hw: tuple[int, int], pipeline: str,
                    patch: int = 2) -> Tensor:
    """[steps + 1] float64 EDM sigmas of the pipeline's own schedule for an h x w latent, ending in 0:
    FlowMatchEulerDiscreteScheduler.set_timesteps called as StableDiffusion3Pipeline / FluxPipeline call it
    (FLUX: sigmas linspace(1, 1/steps, steps) and mu from the image's token count; SD3: `steps`, and mu only if
    its scheduler shifts dynamically). `patch`: tokens per latent side (SD3's patch_size, FLUX's 2x2 packing)."""
    if pipeline not in PIPELINES:
        raise UserError(f"no sampling schedule for {pipeline!r}; one of {', '.join(PIPELINES)}")
    if steps < 1:
        raise UserError(f"the number of sampling steps must be at least 1, got {steps}")
    scheduler = flow_scheduler(scheduler_config)
    module = _pipeline_module(pipeline)
    tokens = (int(latent_hw[0]) // patch) * (int(latent_hw[1]) // patch)
    kwargs: dict[str, Any] = {}
    sigmas = None
    if pipeline == "FluxPipeline":
        sigmas = np.linspace(1.0, 1 / steps, steps)
        if getattr(scheduler.config, "use_flow_sigmas", False):
            sigmas = None
        kwargs["mu"] = resolution_mu(scheduler, tokens, pipeline)
    elif scheduler.config.get("use_dynamic_shifting", None):
        kwargs["mu"] = resolution_mu(scheduler, tokens, pipeline)
    module.retrieve_timesteps(scheduler, steps, "cpu", sigmas=sigmas, **kwargs)
    return edm_sigma(scheduler.sigmas)


def _pipeline_module(pipeline: str) -> Any:
    if pipeline == "FluxPipeline":
        from diffusers.pipelines.flux import pipeline_flux

        return pipeline_flux
    from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3

    return pipeline_stable_diffusion_3


def uniform_to_u(q: Tensor, scheme: str, logit_mean: float, logit_std: float, mode_scale: float) -> Tensor:
    """The u of diffusers' compute_density_for_timestep_sampling as a function of a uniform q in (0, 1) (the same
    law: logit_normal's sigmoid(N(m, s^2)) by its inverse CDF, mode's map of a uniform, else the uniform)."""
    q = q.to(torch.float64)
    if scheme == "logit_normal":
        return torch.sigmoid(logit_mean + logit_std * torch.special.ndtri(q))
    if scheme == "mode":
        return 1 - q - mode_scale * (torch.cos(math.pi * q / 2) ** 2 - 1 + q)
    return q
