"""The starting point of a fine-tune of a flow-matching base (SD3 / SD3.5, FLUX.1): its stock transformer, its own
objective and schedule, its pipeline's VAE and text encoders, and crops that carry their place through the base's
own position encoding (models/sd3.py, models/flux.py), so the weights stay stock and export to the stock pipeline.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Any

from latentpatch.config import RunConfig, load_config
from latentpatch.errors import UserError

if TYPE_CHECKING:
    from latentpatch.finetuning.diffusers_bases import DiffusersBase

# The pipelines' own T5 sequence lengths (max_sequence_length's defaults): what their text was trained with.
TEXT_LENGTH = {"SD3Transformer2DModel": 256, "FluxTransformer2DModel": 512}


def flow_base(found: DiffusersBase, config: str | os.PathLike | None,
              text_encoder: str | None) -> tuple[RunConfig, dict[str, Any], dict[str, Any]]:
    """A fine-tune's config, starting weights and provenance (finetune.json) for the flow transformer of pipeline
    `found` (starting_points.diffusers_base makes them its FinetuneBase)."""
    from latentpatch.diffusion.flow import FLUX_DEFAULTS, SD3_DEFAULTS
    from latentpatch.diffusion.flow_schedule import SIGMA_AT_T1, edm_sigma, flow_scheduler
    from latentpatch.models import PretrainedConfig
    from latentpatch.models.widen import json_config

    name = found.class_name
    if text_encoder is not None:
        raise UserError(f"the {name} is conditioned on its pipeline's own text encoders (CLIP and T5), which no other "
                        "encoder can stand for; drop --text-encoder")
    choice = found.default_text()
    net = found.load_network()
    scheduler = {k: v for k, v in found.scheduler.items() if k != "_diffusers_version"}
    cfg = load_config(config) if config is not None else RunConfig()
    cfg.model = dataclasses.replace(cfg.model, arch="pretrained", num_classes=0, text_dim=0, pooled_text_dim=0,
                                    pretrained=PretrainedConfig(name, json_config(net)))
    lowest = float(edm_sigma(flow_scheduler(scheduler).sigmas.min()))  # the training table's least noise
    cfg.edm = dataclasses.replace(cfg.edm, precond="flow", scheduler=scheduler, sigma_min=lowest,
                                  sigma_max=SIGMA_AT_T1)
    cfg.flow = dataclasses.replace(SD3_DEFAULTS if name == "SD3Transformer2DModel" else FLUX_DEFAULTS)
    # Crops on the token grid, their place read back from per-axis coordinates (models/token_grid.py).
    cfg.patches = dataclasses.replace(cfg.patches, aligned=True, coordinate_scale="per-axis")
    cfg.text = dataclasses.replace(cfg.text, model=choice.model, pretrained=None, layer=choice.layer,
                                   padding=choice.padding, pooled=True, max_length=TEXT_LENGTH[name])
    describe: dict[str, Any] = {"base": found.source, "kind": name, "pipeline": found.root, "precond": "flow",
                                "scheduler": scheduler.get("_class_name"), "text_encoder": {"model": choice.model,
                                                                                           "why": choice.reason}}
    return cfg, {"net.transformer." + k: v for k, v in net.state_dict().items()}, describe


def check_text_widths(cfg: RunConfig) -> None:
    """The text encoder's token and pooled widths are what the transformer's context embedder and pooled map take."""
    config = cfg.model.pretrained.config
    want = (int(config["joint_attention_dim"]), int(config["pooled_projection_dim"]))
    if (cfg.model.text_dim, cfg.model.pooled_text_dim) != want:
        raise UserError(f"the text encoder {cfg.text.model} gives tokens {cfg.model.text_dim} wide and a pooled "
                        f"embedding {cfg.model.pooled_text_dim} wide, but the {cfg.model.pretrained.class_name} takes "
                        f"{want[0]} and {want[1]}; encode with the pipeline's own text encoders")
