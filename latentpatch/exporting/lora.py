"""A LoRA run's adapters in an export: merged into the weights, or kept separate as the diffusers/peft LoRA file
that `pipe.load_lora_weights` reads.

`separate` serves a UNet2DConditionModel (a text UNet trained here, a Stable Diffusion 1.x/2.x fine-tune): the
one network class whose diffusers loader (StableDiffusionLoraLoaderMixin, which the exported pipeline has)
takes adapters. The folder's unet/ then holds the base weights and the layers the fine-tune trained whole
(conv_in with its coordinate channels); lora/pytorch_lora_weights.safetensors holds the adapters, at the scale
latentpatch trained them (lora_alpha = rank). It serves the flow transformers too (SD3Transformer2DModel,
FluxTransformer2DModel: the stock pipelines' SD3 / FLUX LoRA loaders) and SDXL's UNet (StableDiffusionXLPipeline's
loader), whose weights stay stock. latentpatch's DiT,
UNet2DModel and DiTTransformer2DModel have no diffusers LoRA loader: their adapters are merged.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from latentpatch.errors import UserError

LORA_MODES = ("merged", "separate")
LORA_DIR = "lora"
SEPARATE_CLASSES = ("UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel")
# The pipeline whose LoRA loader reads a network class's adapters (and whose save_lora_weights writes them).
LOADERS = {"UNet2DConditionModel": ("StableDiffusionLoraLoaderMixin", "unet"),
           "SD3Transformer2DModel": ("SD3LoraLoaderMixin", "transformer"),
           "FluxTransformer2DModel": ("FluxLoraLoaderMixin", "transformer")}
SDXL_LOADER = ("StableDiffusionXLLoraLoaderMixin", "unet")  # an SDXL UNet's: StableDiffusionXLPipeline's loader


def network_class(net: nn.Module) -> str:
    inner = getattr(net, "unet", None) or getattr(net, "transformer", None) or net
    return type(inner).__name__


def lora_mode(lora_rank: int, net: nn.Module, asked: str | None) -> str | None:
    """None for a run without adapters; else the mode asked for, by default `separate` where it applies."""
    if asked is not None and asked not in LORA_MODES:
        raise UserError(f"--lora must be one of {', '.join(LORA_MODES)}, got {asked!r}")
    if lora_rank <= 0:
        if asked is not None:
            raise UserError(f"--lora {asked}: this run has no LoRA adapters (model.lora_rank is 0)")
        return None
    separable = network_class(net) in SEPARATE_CLASSES
    if asked == "separate" and not separable:
        raise UserError(f"--lora separate needs a network whose diffusers pipeline loads LoRA files "
                        f"({', '.join(SEPARATE_CLASSES)}); this run's network is a {network_class(net)}: export it "
                        "with --lora merged")
    return asked or ("separate" if separable else "merged")


def unmerged_network(cfg, latent_channels: int, weights_file: Path) -> nn.Module:
    """The run's network with its adapters as trained (load_run folds them in): built and loaded afresh."""
    from latentpatch import checkpoints as ckpt
    from latentpatch.denoiser import build_precond

    precond = build_precond(cfg, latent_channels, device="cpu")
    ckpt.load_weights(precond, weights_file)
    return precond.net.eval()


def split_adapters(net: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(base weights, adapters) of the diffusers model inside `net` (its UNet or transformer): the base under its
    plain names (adapters left out, not merged), the adapters as peft names them (`...to_q.lora_A.weight`)."""
    from peft import get_peft_model_state_dict

    name = LOADERS[network_class(net)][1]
    prefix = name + "."
    adapters = {k[len(prefix):]: v.detach().clone() for k, v in get_peft_model_state_dict(net).items()}
    base = {k.replace(".base_layer.", "."): v.detach().clone() for k, v in getattr(net, name).state_dict().items()
            if ".lora_" not in k}
    return base, adapters


def write_lora_file(folder: Path, adapters: dict[str, torch.Tensor], rank: int,
                    network: str = "UNet2DConditionModel", loader: tuple[str, str] | None = None) -> Path:
    """folder/pytorch_lora_weights.safetensors in diffusers' format, with the adapter config beside the tensors,
    written by the save_lora_weights of the pipeline that loads a `network`'s adapters (or of `loader`: the mixin's
    name and the component, SDXL_LOADER)."""
    import diffusers.loaders

    from latentpatch.models.lora import DIFFUSERS_TARGETS

    loader, component = loader or LOADERS[network]
    metadata = {"r": rank, "lora_alpha": rank, "target_modules": list(DIFFUSERS_TARGETS), "lora_dropout": 0.0}
    getattr(diffusers.loaders, loader).save_lora_weights(
        folder, **{f"{component}_lora_layers": adapters, f"{component}_lora_adapter_metadata": metadata})
    return folder / "pytorch_lora_weights.safetensors"
