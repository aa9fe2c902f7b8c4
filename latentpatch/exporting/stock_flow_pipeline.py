"""The export target for a fine-tune of a flow-matching base (SD3 / SD3.5, FLUX.1): the base's own pipeline folder
with the fine-tuned transformer in it, so that StableDiffusion3Pipeline / FluxPipeline.from_pretrained(OUT) load it
with no remote code. Its weights stay stock: a crop told its place through the base's own position encoding
(models/sd3.py, models/flux.py), never through extra channels.

    OUT/model_index.json, transformer/, scheduler/, vae/, text_encoder*/, tokenizer*/   as the base's pipeline

The stock pipeline samples with its own FlowMatchEulerDiscreteScheduler: `latentpatch sample --sampler euler`
(over the same schedule, diffusion/flow_schedule.py) gives its images for the same initial noise.

The step cache (`latentpatch sample --cache step`) is diffusers' TaylorSeer hook, so it runs in the exported FLUX
pipeline too: FluxPipeline names a cache context for each transformer call, and `cache_call` is the line that
enables the same cache there (its images are `--cache step`'s, tests/test_flow_finetune.py).
StableDiffusion3Pipeline names no context, and diffusers' stateful hooks refuse to run without one: an SD3
export samples uncached, and `latentpatch sample --cache step` is the way to cache it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from latentpatch.errors import UserError
from latentpatch.runs import LoadedRun


def serves(loaded: LoadedRun) -> bool:
    return loaded.cfg.edm.precond == "flow"


def base_pipeline(loaded: LoadedRun) -> str:
    """The folder of the base pipeline: its text encoders' record names it (transformers:FOLDER)."""
    from latentpatch.text.identity import split_source

    record = loaded.spec.text_encoder or {}
    source = split_source(record.get("model", ""))
    if not source or not (Path(source).is_dir() or record.get("pipeline")):
        raise UserError(f"run {loaded.run_dir} was fine-tuned from a pipeline latentpatch cannot find again "
                        f"({source or 'not recorded'}); its vae/, scheduler/ and text encoders go into the export")
    return source


def stock_network(loaded: LoadedRun, lora: str | None, folder: Path, component: str = "transformer",
                  loader: tuple[str, str] | None = None) -> Any:
    """The checkpoint's stock diffusers network (its `component`: transformer, or SDXL's unet), adapters merged;
    with `lora` "separate" the base's weights (the stock pretrained ones: nothing else trained) and the adapters
    written to folder/lora/ for load_lora_weights (by `loader`, else the network class's: exporting/lora.py)."""
    import diffusers

    if lora is None:
        return getattr(loaded.precond.net, component)
    if lora == "merged":  # a stock module with the adapters folded into its weights, no peft layers left
        from latentpatch.models.lora import plain_state_dict

        network = getattr(diffusers, loaded.cfg.model.pretrained.class_name).from_config(
            loaded.cfg.model.pretrained.config)
        plain = plain_state_dict(loaded.precond.net)
        network.load_state_dict({k.removeprefix(component + "."): v for k, v in plain.items()})
        return network
    from latentpatch import checkpoints as ckpt
    from latentpatch.exporting.lora import LORA_DIR, network_class, split_adapters, unmerged_network, write_lora_file

    net = unmerged_network(loaded.cfg, int(loaded.info["latent_shape"][0]),
                           Path(loaded.checkpoint) / ckpt.WEIGHT_FILES[loaded.weights])
    base, adapters = split_adapters(net)
    write_lora_file(folder / LORA_DIR, adapters, loaded.cfg.model.lora_rank, network_class(net), loader)
    network = getattr(diffusers, network_class(net)).from_config(loaded.cfg.model.pretrained.config)
    network.load_state_dict(base)  # without adapters, the base: the stock pretrained weights
    return network


def write(loaded: LoadedRun, folder: Path, sampler: str, lora: str | None) -> dict[str, Any]:
    """Save the base pipeline with the run's transformer (the checkpoint's weights, adapters merged or separate)
    into `folder`."""
    import torch
    from diffusers import DiffusionPipeline

    source = base_pipeline(loaded)
    transformer = stock_network(loaded, lora, folder)
    try:
        pipe = DiffusionPipeline.from_pretrained(source, transformer=transformer, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the base pipeline {source} to export beside the fine-tuned transformer: "
                        f"{e}") from e
    pipe.save_pretrained(folder)
    name = type(pipe).__name__
    return {"stock": True, "pipeline": name, "network": type(transformer).__name__,
            "coordinate_scale": "none (the base's own positions)",
            "scheduler": type(pipe.scheduler).__name__,
            "sampler": "euler (the pipeline's own FlowMatchEulerDiscreteScheduler)", "lora": lora,
            "base_pipeline": source, "components": sorted(k for k, v in pipe.components.items() if v is not None),
            "example_call": 'prompt="a red brick wall", num_inference_steps=28', "load": stock_loader(name),
            "cache_call": cache_call() if name == "FluxPipeline" else None}


def stock_loader(pipeline: str) -> tuple[str, str]:
    """(the import, the call with a {folder} slot) that loads a stock pipeline folder: no remote code."""
    return f"from diffusers import {pipeline}", f'{pipeline}.from_pretrained("{{folder}}")'


def cache_call(spec: str = "step") -> str:
    """The Python line that gives an exported FluxPipeline `latentpatch sample --cache SPEC`'s step cache (`pipe`,
    `torch` and diffusers' `TaylorSeerCacheConfig` in scope)."""
    from latentpatch.sampling.caches.spec import parse_cache
    from latentpatch.sampling.caches.step import taylorseer_config

    parsed = parse_cache(spec)
    config = taylorseer_config(parsed.settings, "FluxNetwork")
    return (f"pipe.transformer.enable_cache(TaylorSeerCacheConfig(cache_interval={config.cache_interval}, "
            f"disable_cache_before_step={config.disable_cache_before_step}, max_order={config.max_order}, "
            f"taylor_factors_dtype=torch.float32, cache_identifiers={config.cache_identifiers!r}))")
