"""The export target for an SDXL fine-tune: the base's own StableDiffusionXLPipeline folder with the fine-tuned UNet,
so that StableDiffusionXLPipeline.from_pretrained(OUT) loads it with no remote code. Its weights stay stock: a crop
was told its place through SDXL's own time ids (models/sdxl.py), never through extra channels.

    OUT/model_index.json, unet/, scheduler/, vae/, text_encoder/, text_encoder_2/, tokenizer/, tokenizer_2/
    OUT/lora/                     --lora separate: pytorch_lora_weights.safetensors (StableDiffusionXLPipeline's)

scheduler/ takes the steps latentpatch's sampler takes over the base's own noise schedule (exporting/schedulers.py:
EulerDiscreteScheduler or HeunDiscreteScheduler with Karras sigmas over the run's range), so that for the same
initial noise the pipeline gives `latentpatch sample`'s image; the base's own betas are kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from latentpatch.errors import UserError
from latentpatch.runs import LoadedRun


def serves(loaded: LoadedRun) -> bool:
    from latentpatch.models.sdxl import is_sdxl_unet

    model = loaded.cfg.model
    return model.arch == "pretrained" and is_sdxl_unet(model.pretrained.config)


def check(loaded: LoadedRun) -> None:
    """UserError, before anything is written, for an SDXL run this target cannot export: one whose UNet reads
    coordinate channels (the measurement's widened arm, models/sdxl.py)."""
    if loaded.precond.net.coordinate_inputs:
        raise UserError(f"{loaded.run_dir}'s SDXL UNet reads coordinate channels (conv_in widened to "
                        f"{loaded.cfg.model.pretrained.config['in_channels']} inputs), which StableDiffusionXLPipeline "
                        "does not give; only stock SDXL fine-tunes export")


def write(loaded: LoadedRun, folder: Path, sampler: str, lora: str | None) -> dict[str, Any]:
    """Save the base pipeline with the run's UNet (the checkpoint's weights, adapters merged or separate) and the
    sampler's scheduler into `folder`."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    from latentpatch.exporting.lora import SDXL_LOADER
    from latentpatch.exporting.schedulers import export_scheduler
    from latentpatch.exporting.stock_flow_pipeline import base_pipeline, stock_loader, stock_network

    source = base_pipeline(loaded)
    scheduler = export_scheduler(loaded.cfg.edm, sampler)
    unet = stock_network(loaded, lora, folder, "unet", SDXL_LOADER)
    try:
        pipe = StableDiffusionXLPipeline.from_pretrained(source, unet=unet, scheduler=scheduler, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the base pipeline {source} to export beside the fine-tuned UNet: {e}") from e
    pipe.save_pretrained(folder)
    return {"stock": True, "pipeline": type(pipe).__name__, "network": type(unet).__name__,
            "coordinate_scale": "none (SDXL's own time ids: original_size, crops_coords_top_left, target_size)",
            "scheduler": type(scheduler).__name__, "sampler": sampler, "lora": lora, "base_pipeline": source,
            "components": sorted(k for k, v in pipe.components.items() if v is not None),
            "example_call": 'prompt="a red brick wall", guidance_scale=5.0, num_inference_steps=30',
            "load": stock_loader(type(pipe).__name__)}
