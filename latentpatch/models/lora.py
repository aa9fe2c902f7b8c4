"""LoRA (Hu et al. 2021) through peft: low-rank adapters on the attention projections, the base frozen.

W x becomes W x + (alpha / r) B A x with A [r, in], B [out, r] and B = 0 at the start, so a model with
fresh adapters computes what it computed before. Layers that a fine-tune adds or widens (the UNet's
conv_in with its coordinate channels, the DiT's text embedders, and what a network names in its
`lora_trainable`: the patch embedding of a DiT fine-tuned with coordinate inputs) stay fully trainable.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from latentpatch.errors import UserError

DIT_TARGETS = ["qkv", "proj", "q", "kv"]  # self- and cross-attention projections (models/dit.py)
DIFFUSERS_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]  # diffusers Attention: UNets and pretrained DiTs
UNET_TARGETS = DIFFUSERS_TARGETS
# Layers a fine-tune adds or widens: the UNet's conv_in, the DiT's text maps (a network adds its own in lora_trainable).
TRAINABLE_PREFIXES = ("conv_in.", "text_embedder.", "pooled_embedder.")
DIFFUSERS_WRAPPED = ("unet.", "transformer.")  # where UNetDenoiser / PretrainedDiT keep the diffusers model


def _targets(net: nn.Module) -> list[str]:
    return DIFFUSERS_TARGETS if hasattr(net, "unet") or hasattr(net, "transformer") else DIT_TARGETS


def _leaf(name: str) -> str:
    """A parameter's name inside the diffusers model (or the DiT)."""
    for prefix in DIFFUSERS_WRAPPED:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def add_lora(net: nn.Module, rank: int, alpha: float | None = None) -> nn.Module:
    """Inject rank-`rank` adapters into `net` in place; only adapters and TRAINABLE_PREFIXES layers train."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError as e:
        raise UserError("LoRA (model.lora_rank > 0) needs peft: pip install 'latentpatch[lora]'") from e
    if rank < 1:
        raise UserError(f"model.lora_rank must be >= 1 to add adapters, got {rank}")
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, lora_dropout=0.0, target_modules=_targets(net))
    try:
        inject_adapter_in_model(config, net)
    except ValueError as e:
        raise UserError(f"could not add LoRA adapters to the {type(net).__name__}: {e}") from e
    # nothing widened: adapters only; else the layers a fine-tune widens or adds, and what the network names
    trainable = () if getattr(net, "stock_weights", False) else TRAINABLE_PREFIXES
    own = tuple(getattr(net, "lora_trainable", ()))
    for name, p in net.named_parameters():
        p.requires_grad_("lora_" in name or _leaf(name).startswith(trainable) or name.startswith(own))
    return net


def has_lora(module: nn.Module) -> bool:
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return False  # without peft no module can hold adapters
    return any(isinstance(m, LoraLayer) for m in module.modules())


@torch.no_grad()
def merge_lora(module: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (W <- W + scale B A), so inference costs what it did before."""
    from peft.tuners.lora import LoraLayer

    for m in module.modules():
        if isinstance(m, LoraLayer) and not m.merged:
            m.merge()
    return module


def plain_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The state dict with adapters merged and peft's names undone (`x.base_layer.weight` -> `x.weight`)."""
    if not has_lora(module):
        return {k: v.detach().clone() for k, v in module.state_dict().items()}
    merged = merge_lora(copy.deepcopy(module))
    out = {}
    for key, value in merged.state_dict().items():
        if ".lora_" in key:
            continue
        out[key.replace(".base_layer.", ".")] = value.detach().clone()
    return out
