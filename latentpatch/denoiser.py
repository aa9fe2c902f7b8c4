"""The one place a denoiser (network + preconditioning) is assembled from a RunConfig, so training, loading
and fine-tuning build the same thing."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from latentpatch.config import RunConfig
from latentpatch.diffusion.edm import EDMObjective, EDMPrecond
from latentpatch.diffusion.vp import VPPrecond
from latentpatch.errors import UserError
from latentpatch.models import build_network


def build_precond(
    cfg: RunConfig, latent_channels: int, *, device: torch.device | str | None = None,
    init_state: dict[str, torch.Tensor] | None = None,
) -> nn.Module:
    """build_network + its preconditioning (edm.precond: EDMPrecond, or a pretrained DDPM model's own
    VPPrecond); `device` only picks the attention backend, the module stays on the CPU.

    `init_state` (a fine-tune's starting weights, plain keys) is loaded before model.lora_rank adapters are
    added, so the adapters start from it.
    """
    if cfg.edm.sigma_data is None:
        raise UserError("edm.sigma_data is not set: training takes it from the latent store (its measured latent "
                        "std); outside training give it in the config")
    net = build_network(cfg.model, latent_channels, device=device)
    if cfg.edm.precond == "vp":
        precond = VPPrecond(net, cfg.edm.scheduler)
    elif cfg.edm.precond == "flow":
        from latentpatch.diffusion.flow import FlowPrecond

        precond = FlowPrecond(net, int(cfg.edm.scheduler.get("num_train_timesteps", 1000)))
    else:
        precond = EDMPrecond(net, sigma_data=cfg.edm.sigma_data)
    if init_state is not None:
        try:
            precond.load_state_dict(init_state, strict=True)
        except RuntimeError as e:
            raise UserError(f"the starting weights do not fit the model built from the config: {e}") from e
    if cfg.model.lora_rank > 0:
        from latentpatch.models.lora import add_lora

        add_lora(precond.net, cfg.model.lora_rank)
    return precond


def build_objective(cfg: RunConfig) -> Any:
    """What training draws noise levels from and minimises (draw_sigmas, loss): EDM's objective, for models trained
    here and for the VP bases (their own preconditioning under EDM's loss and truncated log-normal,
    diffusion/vp.py); a flow-matching base's own (diffusion/flow.py) or, with vp.objective=ddpm, a VP base's DDPM
    loss (diffusion/ddpm.py), as diffusers' training examples train them."""
    if cfg.edm.precond == "flow":
        from latentpatch.diffusion.flow import FlowMatching
        from latentpatch.models.flow_base import flow_patch

        return FlowMatching(cfg.flow, cfg.edm.scheduler, patch=flow_patch(cfg.model))
    if cfg.edm.precond == "vp" and cfg.vp.objective == "ddpm":
        from latentpatch.diffusion.ddpm import DDPMObjective

        return DDPMObjective(cfg.vp, cfg.edm.scheduler)
    return EDMObjective(cfg.edm)


def sampling_sigmas(cfg: RunConfig, steps: int, latent_hw: tuple[int, int]) -> torch.Tensor | None:
    """The noise levels a run samples at: a flow-matching base's own pipeline schedule (its shift, FLUX's from
    the image's token count; diffusion.flow_schedule) for an h x w latent, else None: the Karras schedule over
    edm.sigma_min..sigma_max that every sampler builds."""
    if cfg.edm.precond != "flow":
        return None
    from latentpatch.diffusion.flow_schedule import pipeline_sigmas
    from latentpatch.models.flow_base import flow_patch, flow_pipeline

    return pipeline_sigmas(cfg.edm.scheduler, steps, tuple(int(s) for s in latent_hw),
                           flow_pipeline(cfg.model.pretrained.class_name), flow_patch(cfg.model))


def heldout_grid(cfg: RunConfig) -> Callable[[int, tuple[int, int]], torch.Tensor] | None:
    """The fixed noise levels a run's held-out loss is scored at, (levels, latent (h, w)) -> [levels]: a flow base's
    own (the mid-quantiles of its training levels for an image of that shape: FLUX's shift depends on it), a DDPM
    objective's (the mid-quantiles of its uniform timesteps); None: the mid-quantiles of EDM's log-normal
    (edm.P_mean, edm.P_std), for every other run."""
    if cfg.edm.precond != "flow" and not (cfg.edm.precond == "vp" and cfg.vp.objective == "ddpm"):
        return None
    objective = build_objective(cfg)
    return lambda n, hw: objective.heldout_sigmas(n, hw)


def size_multiple(net: nn.Module) -> int:
    """The side every input must divide into: the DiT patch size, or the UNet's total downsampling."""
    multiple = getattr(net, "size_multiple", None) or getattr(net, "patch_size", None) or 1
    return int(multiple)
