"""The starting point of a fine-tune of SDXL (StableDiffusionXLPipeline: the base and its fine-tunes, eps or
v-prediction, zero terminal SNR where the scheduler says so): its stock UNet, each crop told its place through
SDXL's own micro-conditioning (models/sdxl.py), so the weights stay stock and export to the stock pipeline; its own
DDPM schedule and the loss diffusers' SDXL training example computes (vp.objective=ddpm, diffusion/ddpm.py); its
VAE and both of its text encoders.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any

from latentpatch.config import RunConfig, load_config
from latentpatch.errors import UserError
from latentpatch.models.model_config import downsampling

if TYPE_CHECKING:
    from latentpatch.finetuning.diffusers_bases import DiffusersBase, TextChoice

SDXL_PIPELINE = "StableDiffusionXLPipeline"


def vae_scale_factor(found: DiffusersBase) -> int:
    """Pixels per latent pixel of the pipeline's VAE, as the pipeline computes it."""
    blocks = (found.vae_config or {}).get("block_out_channels")
    if not blocks:
        raise UserError(f"{found.source} has no readable vae/config.json: SDXL's micro-conditioning is in pixels, so "
                        "the fine-tune needs the pipeline's VAE")
    return downsampling(found.vae_config)


def _pipeline_class(root: str) -> str | None:
    """model_index.json's _class_name of a local folder or cached hub id."""
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(root).get("_class_name")
    except (OSError, ValueError):
        return None


def _check_pipeline(found: DiffusersBase) -> None:
    if not (found.is_pipeline and found.scheduler is not None and found.has_vae):
        raise UserError(f"an SDXL UNet is fine-tuned from its pipeline folder (StableDiffusionXLPipeline: unet/, its "
                        f"scheduler/, vae/ and both text encoders); {found.source} is not one")
    pipeline = _pipeline_class(found.root)
    if pipeline != SDXL_PIPELINE:
        raise UserError(f"{found.source} holds an SDXL-style UNet but is a {pipeline or 'pipeline of unknown class'}; "
                        f"latentpatch fine-tunes the text-to-image {SDXL_PIPELINE} (not the refiner, inpainting or "
                        "image-to-image ones)")


def sdxl_base(found: DiffusersBase, config: str | os.PathLike | None, text_encoder: str | None
              ) -> tuple[RunConfig, dict[str, Any], dict[str, Any], TextChoice]:
    """A fine-tune's config, initial state, description and text encoder for the SDXL UNet of pipeline `found`
    (starting_points makes its FinetuneBase of them)."""
    from latentpatch.diffusion.ddpm import VPConfig
    from latentpatch.diffusion.vp import prediction_type, sigma_range
    from latentpatch.finetuning.diffusers_bases import TextChoice, _has_transformers
    from latentpatch.models import PretrainedConfig
    from latentpatch.models.sdxl import check_sdxl_unet
    from latentpatch.models.widen import json_config
    from latentpatch.text.flow_encoder import FLOW_TEXT_PIPELINES, PIPELINE_PADDING
    from latentpatch.text.identity import TRANSFORMERS_PREFIX

    _check_pipeline(found)
    if str(found.scheduler.get("_class_name", "")).startswith("EDM"):
        raise UserError(f"{found.source} is an SDXL UNet trained in EDM's formulation ({found.scheduler['_class_name']}: "
                        "Playground v2.5-style), not on a DDPM schedule; latentpatch fine-tunes DDPM-trained SDXL models")
    check_sdxl_unet(found.config)  # no inpainting / instruct inputs, no LCM guidance embedding, no refiner
    if text_encoder is not None:
        raise UserError("SDXL is conditioned on its pipeline's own two text encoders (CLIP ViT-L and OpenCLIP "
                        "ViT-bigG), which no other encoder can stand for; drop --text-encoder")
    if not _has_transformers():
        raise UserError("SDXL's text encoders load through transformers: pip install 'latentpatch[transformers]'")
    choice = TextChoice(TRANSFORMERS_PREFIX + found.root, None, "last", PIPELINE_PADDING,
                        "the pipeline's own text encoders (transformers)")
    net = found.load_network()
    scheduler = {k: v for k, v in found.scheduler.items() if k != "_diffusers_version"}
    cfg = load_config(config) if config is not None else RunConfig()
    factor = vae_scale_factor(found)
    cfg.model = dataclasses.replace(cfg.model, arch="pretrained", num_classes=0, text_dim=0, pooled_text_dim=0,
                                    pretrained=PretrainedConfig("UNet2DConditionModel", json_config(net), factor))
    low, high = sigma_range(scheduler)  # the pretrained noise levels, all of them (sampling's Karras range)
    cfg.edm = dataclasses.replace(cfg.edm, precond="vp", scheduler=scheduler, sigma_min=low, sigma_max=high)
    cfg.vp = VPConfig(objective="ddpm", snr_gamma=cfg.vp.snr_gamma)
    cfg.patches = dataclasses.replace(cfg.patches, coordinate_scale="per-axis")  # offsets and sizes read back
    cfg.text = dataclasses.replace(cfg.text, model=choice.model, pretrained=None, layer=choice.layer,
                                   padding=choice.padding, pooled=True, max_length=FLOW_TEXT_PIPELINES[SDXL_PIPELINE])
    describe: dict[str, Any] = {
        "base": found.source, "kind": "SDXL UNet2DConditionModel", "pipeline": found.root, "precond": "vp",
        "objective": "ddpm", "scheduler": scheduler.get("_class_name"), "prediction_type": prediction_type(scheduler),
        "zero_terminal_snr": bool(scheduler.get("rescale_betas_zero_snr", False)), "sigma_range": [low, high],
        "crop_place": "time ids (original_size, crops_coords_top_left, target_size)", "vae_scale_factor": factor,
        "text_encoder": {"model": choice.model, "why": choice.reason}}
    return cfg, {"net.unet." + k: v for k, v in net.state_dict().items()}, describe, choice
