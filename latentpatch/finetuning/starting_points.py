"""The starting point of a fine-tune: a latentpatch run, or a pretrained diffusers base (latentpatch.finetuning.diffusers_bases) made
into a config and weights that compute exactly what the base computed.

A diffusers UNet gains zero-initialised coordinate channels (models/widen.py), but for the bases that carry a
crop's place in their own language (a DiT: its position table computed from the coordinates, models/pretrained_dit.py;
SD3 / FLUX: flow_bases.py; SDXL: sdxl_base.py); with the pipeline's scheduler config it keeps its own
preconditioning (edm.precond "vp", diffusion/vp.py) and
its own noise levels; the pipeline's vae/ is the default autoencoder and its text encoder (or the open_clip
tower whose features match) the default text encoder.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from latentpatch.finetuning.diffusers_bases import SD_TEXT, DiffusersBase, TextChoice
from latentpatch.config import RunConfig, load_config
from latentpatch.conditioning.spec import NO_TEXT
from latentpatch.errors import UserError
from latentpatch.models.model_config import FLOW_CLASSES
from latentpatch.models.sdxl import is_sdxl_unet


@dataclass
class FinetuneBase:
    cfg: RunConfig
    state: dict[str, torch.Tensor]  # plain precond keys (net.*)
    autoencoder: dict[str, Any] | None  # a run base's AutoencoderInfo dict (the store must be in its latent space)
    resolution: list[int] | None  # default pixel size to encode an image folder at
    text_record: dict[str, Any] | None  # the text encoder a run base was trained with
    describe: dict[str, Any]  # provenance, written to OUT/finetune.json
    vae: str | None = None  # a diffusers base's default autoencoder (its pipeline's vae/)
    text_choice: TextChoice | None = None  # a diffusers base's text encoder (asked for, or its default)
    pipeline: DiffusersBase | None = None

    @property
    def class_name(self) -> str | None:
        return self.cfg.model.pretrained.class_name if self.cfg.model.arch == "pretrained" else None


def run_base(base: Path, weights: str) -> FinetuneBase:
    from latentpatch.models.lora import plain_state_dict
    from latentpatch.runs import load_run

    loaded = load_run(base, weights=weights, device="cpu")
    cfg = copy.deepcopy(loaded.cfg)
    cfg.model.lora_rank = 0  # a LoRA base is merged: the fine-tune starts from its whole weights
    return FinetuneBase(
        cfg=cfg, state=plain_state_dict(loaded.precond), autoencoder=loaded.info["autoencoder"],
        resolution=list(loaded.info["resolution"]), text_record=loaded.spec.text_encoder,
        describe={"base": str(base.resolve()), "kind": "latentpatch run", "weights": weights,
                  "checkpoint": str(loaded.checkpoint), "checkpoint_id": loaded.checkpoint_id, "step": loaded.step},
    )


def diffusers_base(source: str, config: str | os.PathLike | None, text_encoder: str | None) -> FinetuneBase:
    """The widened network, its own preconditioning and noise levels, and the pipeline's defaults."""
    from latentpatch.finetuning.diffusers_bases import resolve_base
    from latentpatch.diffusion.vp import prediction_type, sigma_range
    from latentpatch.models import PretrainedConfig
    from latentpatch.models.widen import json_config

    found = resolve_base(source)
    if found.class_name in FLOW_CLASSES:
        from latentpatch.finetuning.flow_bases import flow_base

        cfg, state, describe = flow_base(found, config, text_encoder)
        size = found.default_resolution()
        return FinetuneBase(cfg=cfg, state=state, autoencoder=None, resolution=[size, size] if size else None,
                            text_record=None, describe=describe, vae=found.root if found.has_vae else None,
                            text_choice=found.default_text(), pipeline=found)
    if is_sdxl_unet({**found.config, "_class_name": found.class_name}):
        from latentpatch.finetuning.sdxl_base import sdxl_base

        cfg, state, describe, choice = sdxl_base(found, config, text_encoder)
        size = found.default_resolution()
        return FinetuneBase(cfg=cfg, state=state, autoencoder=None, resolution=[size, size] if size else None,
                            text_record=None, describe=describe, vae=found.root, text_choice=choice, pipeline=found)
    net = found.load_network()
    name = found.class_name
    if name == "DiTTransformer2DModel":  # stock: the crop's place is in its position table (models/pretrained_dit.py)
        classes, prefix = int(net.config.num_embeds_ada_norm or 0), "net.transformer."
    else:
        from latentpatch.models.widen import widen_unet

        widen_unet(net, net.conv_in.in_channels)
        classes, prefix = 0, "net.unet."
    cfg = load_config(config) if config is not None else RunConfig()
    cfg.model = dataclasses.replace(cfg.model, arch="pretrained", num_classes=classes, text_dim=0, pooled_text_dim=0,
                                    pretrained=PretrainedConfig(name, json_config(net)))
    cfg.text.pooled = False  # a pretrained UNet's time embedding has no input for it
    if name == "DiTTransformer2DModel":
        cfg.patches.aligned = True  # crops on its token grid: the positions of the table it was trained with
        cfg.patches.coordinate_scale = "per-axis"  # its positions are read back from per-axis coordinates
    if name != "UNet2DConditionModel":
        cfg.text.model = NO_TEXT
    describe: dict[str, Any] = {"base": source, "kind": name, "pipeline": found.root if found.is_pipeline else None}
    if found.scheduler is not None:
        scheduler = {k: v for k, v in found.scheduler.items() if k != "_diffusers_version"}
        cfg.edm.precond, cfg.edm.scheduler = "vp", scheduler
        cfg.edm.sigma_min, cfg.edm.sigma_max = sigma_range(scheduler)  # the pretrained noise levels, all of them
        describe.update(precond="vp", scheduler=scheduler.get("_class_name"),
                        prediction_type=prediction_type(scheduler), sigma_range=[cfg.edm.sigma_min, cfg.edm.sigma_max])
    else:
        describe.update(precond="edm", note="no scheduler/scheduler_config.json beside the network: EDM "
                                            "preconditioning, which the network adapts to while it trains")
    choice = text_choice(found, text_encoder)
    if choice is not None:
        describe["text_encoder"] = {"model": choice.model, "pretrained": choice.pretrained, "layer": choice.layer,
                                    "padding": choice.padding, "why": choice.reason}
    size = found.default_resolution()
    state = {prefix + k: v for k, v in net.state_dict().items()}
    return FinetuneBase(cfg=cfg, state=state, autoencoder=None, resolution=[size, size] if size else None,
                        text_record=None, describe=describe, vae=found.root if found.has_vae else None,
                        text_choice=choice, pipeline=found)


def text_choice(found: DiffusersBase, text_encoder: str | None) -> TextChoice | None:
    """The text encoder of a UNet2DConditionModel fine-tune: the one asked for, with the features its UNet was
    trained on (Stable Diffusion's layer and padding, by cross_attention_dim), else the pipeline's default."""
    from latentpatch.text.identity import TRANSFORMERS_PREFIX, parse_text_encoder

    if found.class_name != "UNet2DConditionModel":
        if text_encoder is not None:
            kind = "class-conditional DiT" if found.class_name == "DiTTransformer2DModel" else found.class_name
            raise UserError(f"the base {kind} has no cross-attention, so it is fine-tuned without text; drop "
                            "--text-encoder (or start from a UNet2DConditionModel)")
        return None
    if text_encoder is None:
        return found.default_text()
    model, pretrained = parse_text_encoder(text_encoder)
    if model.startswith(TRANSFORMERS_PREFIX):
        from latentpatch.text.pipeline_encoder import pipeline_padding

        return TextChoice(model, None, "last", pipeline_padding(model), "asked for (text_encoder=)")
    recipe = SD_TEXT.get(found.config.get("cross_attention_dim"))
    layer, padding = (recipe.layer, recipe.padding) if recipe else ("last", "masked")
    return TextChoice(model, pretrained, layer, padding, "asked for (text_encoder=)")


def load_choice(choice: TextChoice, device: str | None) -> Any:
    from latentpatch.text.loader import load_text_encoder

    return load_text_encoder(choice.model, choice.pretrained, device=device, layer=choice.layer,
                             padding=choice.padding)
