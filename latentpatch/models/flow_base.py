"""A flow-matching pipeline folder (StableDiffusion3Pipeline, FluxPipeline) as a denoiser: its stock transformer
wrapped as a Patch Diffusion network, FlowPrecond around it, and its own sampling schedule.

The smallest glue between a pipeline folder and latentpatch's samplers; fine-tuning builds on the same parts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from latentpatch.errors import UserError

FLOW_PIPELINES = {"StableDiffusion3Pipeline": "SD3Transformer2DModel", "FluxPipeline": "FluxTransformer2DModel"}


def wrap_flow_transformer(transformer: nn.Module, **kwargs: Any) -> nn.Module:
    """SD3Network or FluxNetwork around a stock SD3Transformer2DModel / FluxTransformer2DModel (kwargs: FluxNetwork's
    guidance_scale)."""
    name = type(transformer).__name__
    if name == "SD3Transformer2DModel":
        from latentpatch.models.sd3 import SD3Network

        return SD3Network(transformer)
    if name == "FluxTransformer2DModel":
        from latentpatch.models.flux import FluxNetwork

        return FluxNetwork(transformer, **kwargs)
    raise UserError(f"a {name} is not a flow-matching transformer latentpatch wraps "
                    f"({', '.join(FLOW_PIPELINES.values())})")


def flow_network(cfg: Any, latent_channels: int) -> nn.Module:
    """The SD3Network / FluxNetwork of a run's model config (model.arch=pretrained, a flow class), stock weights to
    come from a checkpoint; its latent channels must be the store's."""
    from latentpatch.models.flux import FluxNetwork
    from latentpatch.models.sd3 import SD3Network

    config = cfg.pretrained.config
    if cfg.num_classes:
        raise UserError(f"the {cfg.pretrained.class_name} is text-conditioned, not class-conditional; set "
                        "model.num_classes=0")
    net = (SD3Network if cfg.pretrained.class_name == "SD3Transformer2DModel" else FluxNetwork).from_config(config)
    if net.latent_channels != latent_channels:
        raise UserError(f"the {cfg.pretrained.class_name} takes {net.latent_channels}-channel latents but the store "
                        f"holds {latent_channels}-channel ones; encode with the base pipeline's vae/")
    if cfg.grad_checkpointing:
        net.transformer.enable_gradient_checkpointing()
    return net


def flow_patch(cfg: Any) -> int:
    """Latent pixels per token side of a flow base (model config): SD3's patch_size, FLUX's 2x2 packing."""
    from latentpatch.models.flux import FLUX_PACKING

    if cfg.pretrained.class_name == "SD3Transformer2DModel":
        return int(cfg.pretrained.config.get("patch_size", 2))
    return FLUX_PACKING


def flow_pipeline(class_name: str) -> str:
    """The pipeline class of a flow transformer class (its sampling schedule and export follow it)."""
    return {v: k for k, v in FLOW_PIPELINES.items()}[class_name]


@dataclass
class FlowBase:
    """The denoiser of a flow-matching pipeline folder and what sampling it needs."""

    precond: nn.Module  # FlowPrecond(SD3Network | FluxNetwork)
    pipeline: str  # the pipeline class: StableDiffusion3Pipeline or FluxPipeline
    scheduler: dict[str, Any]  # its scheduler_config.json
    patch: int  # latent pixels per token side

    def sampling_sigmas(self, steps: int, latent_hw: tuple[int, int]) -> Tensor:
        """The pipeline's own schedule for an h x w latent, in EDM sigmas (flow_schedule.pipeline_sigmas)."""
        from latentpatch.diffusion.flow_schedule import pipeline_sigmas

        return pipeline_sigmas(self.scheduler, steps, latent_hw, self.pipeline, self.patch)


def load_flow_base(folder: str | Path, **kwargs: Any) -> FlowBase:
    """The transformer/ and scheduler/ of a local pipeline folder, float32, in eval mode on the CPU."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from latentpatch.diffusion.flow import FlowPrecond
    from latentpatch.hub import load_kwargs

    folder = Path(folder)
    index = folder / "model_index.json"
    pipeline = json.loads(index.read_text()).get("_class_name") if index.is_file() else None
    if pipeline not in FLOW_PIPELINES:
        raise UserError(f"{folder} is not a StableDiffusion3Pipeline or FluxPipeline folder (model_index.json names "
                        f"{pipeline!r})")
    import diffusers

    try:
        transformer = getattr(diffusers, FLOW_PIPELINES[pipeline]).from_pretrained(folder, subfolder="transformer",
                                                                                   **load_kwargs())
        scheduler = dict(FlowMatchEulerDiscreteScheduler.load_config(folder, subfolder="scheduler"))
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the transformer and scheduler of {folder}: {e}") from e
    net = wrap_flow_transformer(transformer.float(), **kwargs)
    precond = FlowPrecond(net, int(scheduler.get("num_train_timesteps", 1000))).eval()
    return FlowBase(precond, pipeline, scheduler, int(net.patch_size))
