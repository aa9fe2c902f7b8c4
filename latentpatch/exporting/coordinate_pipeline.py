"""The export target for networks that read coordinate channels (every run latentpatch trains but a stock DiT
fine-tune that DiTPipeline serves, dit_pipeline.py): a diffusers pipeline folder whose custom pipeline
(shipped/pipeline_latentpatch.py) adds the full coordinate grid (none for a stock DiT: its own position table).

    OUT/model_index.json          names pipeline_latentpatch.LatentPatchPipeline, each component, the pipeline's
                                  config (coordinate scale, latent normalisation, text features)
    OUT/pipeline_latentpatch.py
    OUT/unet/ or OUT/transformer/ the network (transformer/latentpatch_dit.py for latentpatch's own DiT)
    OUT/scheduler/                (scheduler/scheduling_edm_heun.py for EDM's Heun)
    OUT/vae/                      absent for a pixel-space run
    OUT/text_encoder/, OUT/tokenizer/   text-conditioned runs
    OUT/lora/                     --lora separate: pytorch_lora_weights.safetensors
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from latentpatch import checkpoints as ckpt
from latentpatch.exporting import folder as out_folder
from latentpatch.exporting.autoencoder import export_autoencoder
from latentpatch.exporting.lora import LORA_DIR, network_class, split_adapters, unmerged_network, write_lora_file
from latentpatch.exporting.network import ExportedNetwork, export_network
from latentpatch.exporting.schedulers import export_scheduler
from latentpatch.exporting.shipped import PIPELINE_CLASS, PIPELINE_MODULE
from latentpatch.runs import LoadedRun


def serves(loaded: LoadedRun) -> bool:
    """Every run: the networks that read coordinate channels (DiT, UNets, widened pretrained bases), and a stock
    DiT fine-tune that DiTPipeline cannot reproduce (dit_pipeline.serves says which)."""
    return True


def _network(loaded: LoadedRun, lora: str | None, folder: Path) -> ExportedNetwork:
    """The network with its adapters merged, or (lora "separate") its base weights with the adapters written
    to folder/lora/."""
    if lora != "separate":
        return export_network(loaded.precond.net)
    weights_file = Path(loaded.checkpoint) / ckpt.WEIGHT_FILES[loaded.weights]  # verified by load_run
    net = unmerged_network(loaded.cfg, int(loaded.info["latent_shape"][0]), weights_file)
    base, adapters = split_adapters(net)
    write_lora_file(folder / LORA_DIR, adapters, loaded.cfg.model.lora_rank, network_class(net))
    return export_network(net, weights=base)


def _example_call(loaded: LoadedRun) -> str:
    if loaded.spec.text:
        return 'prompt="a red brick wall", guidance_scale=4.0'
    if loaded.spec.num_classes:
        return "class_labels=[0], guidance_scale=4.0"
    return "num_images_per_prompt=1"


def write(loaded: LoadedRun, folder: Path, sampler: str, lora: str | None) -> dict[str, Any]:
    """Write the pipeline folder of `loaded` into `folder`; what was written, for the record."""
    info = loaded.info
    network = _network(loaded, lora, folder)
    scheduler = export_scheduler(loaded.cfg.edm, sampler)
    ae = export_autoencoder(info["autoencoder"])
    text = None
    if loaded.spec.text:
        from latentpatch.exporting.text import export_text

        text = export_text(loaded.text_encoder())
    components = {
        "unet": None, "transformer": None, network.component: network.model, "scheduler": scheduler,
        "vae": ae.vae, "text_encoder": None if text is None else text.text_encoder,
        "tokenizer": None if text is None else text.tokenizer,
    }
    entries = {name: out_folder.save_component(folder, name, obj) for name, obj in components.items()}
    latent_channels, h, w = (int(s) for s in info["latent_shape"])
    config = {
        "coordinate_scale": loaded.cfg.patches.coordinate_scale, "sample_size": [h, w],
        "latent_channels": latent_channels, "coordinate_channels": _coordinate_channels(loaded),
        "autoencoder_factor": ae.factor, "size_multiple": network.size_multiple,
        "latent_scaling_factor": ae.scaling_factor, "latent_shift_factor": ae.shift_factor,
        "num_classes": loaded.spec.num_classes, "text_max_length": 77 if text is None else text.max_length,
        "text_layer": "last" if text is None else text.layer,
        "text_padding": "masked" if text is None else text.padding,
        "text_pooled": bool(loaded.spec.pooled),
    }
    out_folder.copy_shipped(PIPELINE_MODULE, folder)
    out_folder.write_model_index(folder, (PIPELINE_MODULE, PIPELINE_CLASS), entries, config)
    return {"pipeline": f"{PIPELINE_MODULE}.{PIPELINE_CLASS}", "network": entries[network.component][1],
            "scheduler": type(scheduler).__name__, "sampler": sampler, "lora": lora,
            "coordinate_scale": config["coordinate_scale"], "components": entries, "pipeline_config": config,
            "example_call": _example_call(loaded),
            "load": ("from diffusers import DiffusionPipeline",
                     'DiffusionPipeline.from_pretrained("{folder}", trust_remote_code=True)'),
            "about": "A Patch Diffusion model exported by latentpatch: " + (
                "its network sees two coordinate channels after the latent, and this folder's pipeline "
                "(`pipeline_latentpatch.py`) adds the full coordinate grid of the size asked for."
                if config["coordinate_channels"] else "a stock DiT whose positions come from its own sin-cos table, "
                "in this folder's pipeline (`pipeline_latentpatch.py`), which samples any size and class count.")}


def _coordinate_channels(loaded: LoadedRun) -> int:
    """The coordinate channels the pipeline appends to the latent: none for a stock DiT (its own position table)."""
    return int(getattr(loaded.precond.net, "coordinate_inputs", 2))
