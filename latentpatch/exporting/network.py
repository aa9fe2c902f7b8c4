"""A run's network as a model diffusers loads: a stock UNet2DModel / UNet2DConditionModel / DiTTransformer2DModel
with C+2 input channels, or latentpatch's own DiT as the LatentPatchDiT class the folder ships."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from latentpatch.denoiser import size_multiple
from latentpatch.errors import UserError


@dataclass
class ExportedNetwork:
    component: str  # the pipeline component it is: "unet" or "transformer"
    model: nn.Module  # a diffusers ModelMixin holding the run's weights
    size_multiple: int  # the side (latent pixels) every input must divide into
    shipped: bool  # its class is LatentPatchDiT, whose code the folder carries


def _inner(net: nn.Module) -> tuple[str, nn.Module]:
    """The diffusers model inside a latentpatch denoiser, or the DiT itself."""
    if hasattr(net, "unet"):
        return "unet", net.unet
    if hasattr(net, "transformer"):
        return "transformer", net.transformer
    return "dit", net


def plain_weights(module: nn.Module) -> dict[str, torch.Tensor]:
    """The weights under their plain names: LoRA adapters folded in (latentpatch.models.lora)."""
    state = module.state_dict()
    if not any(".lora_" in k for k in state):  # no adapters: peft (seconds to import) is not needed
        return {k: v.detach().clone() for k, v in state.items()}
    from latentpatch.models.lora import plain_state_dict

    return plain_state_dict(module)


def _shipped_dit(dit: nn.Module) -> nn.Module:
    """A LatentPatchDiT of the same shape as latentpatch's DiT `dit` (read off the module, not the config)."""
    from latentpatch.exporting.shipped.latentpatch_dit import LatentPatchDiT

    hidden = dit.x_embedder.out_channels
    block = dit.blocks[0]
    mlp_hidden = block.mlp[0].out_features
    ratio = mlp_hidden / hidden
    if int(hidden * ratio) != mlp_hidden:  # int() of a product that rounds just below the width
        ratio = (mlp_hidden + 0.5) / hidden
    return LatentPatchDiT(
        in_channels=dit.in_channels, hidden_size=hidden, depth=len(dit.blocks), num_heads=block.attn.num_heads,
        patch_size=dit.patch_size, mlp_ratio=ratio, num_classes=dit.num_classes,
        text_dim=0 if dit.text_embedder is None else dit.text_embedder.in_features,
        pooled_text_dim=0 if dit.pooled_embedder is None else dit.pooled_embedder.in_features,
    )


def export_network(net: nn.Module, weights: dict[str, torch.Tensor] | None = None) -> ExportedNetwork:
    """The diffusers model of a run's network `net` (precond.net) with `weights` (plain names; default: `net`'s
    own with any adapters merged)."""
    kind, inner = _inner(net)
    weights = plain_weights(inner) if weights is None else weights
    if kind == "dit":
        model, component = _shipped_dit(inner), "transformer"
    else:
        model, component = type(inner).from_config(inner.config), kind  # a stock class with C+2 inputs
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        raise UserError(f"the run's {type(inner).__name__} does not fit {type(model).__name__}: {e}") from e
    return ExportedNetwork(component, model.eval(), size_multiple(net), shipped=kind == "dit")
