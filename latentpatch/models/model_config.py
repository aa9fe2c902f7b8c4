"""The denoiser's configuration (re-exported by latentpatch.config): shared fields plus one section per
architecture, each checked once when the config is loaded."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from latentpatch.errors import UserError
from latentpatch.models.presets import PRESET_FIELDS, preset_values

ARCHS = ("dit", "unet", "pretrained")
ATTENTION = ("auto", "sdpa", "xformers")


DEFAULT_DIT = "DiT-S/2"  # the size of a DiT given neither a preset nor its fields


@dataclass
class DiTConfig:
    """DiT size (Peebles & Xie 2023). A `preset` ("DiT-S/2" ... "DiT-XL/8") fills depth, hidden_size,
    num_heads and patch_size; a value given beside it must agree with it. Fields given neither way: DiT-S/2's."""

    preset: str | None = None
    hidden_size: int | None = None  # None (not given): the preset's, else DEFAULT_DIT's (384)
    depth: int | None = None  # 12
    num_heads: int | None = None  # 6
    patch_size: int | None = None  # 2
    mlp_ratio: float = 4.0

    def __post_init__(self) -> None:
        # Only fills what was not given, so `check` sees a given value that disagrees with the preset.
        for name, value in preset_values(self.preset or DEFAULT_DIT).items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def check(self) -> None:
        if self.preset is not None:
            for name, value in preset_values(self.preset).items():
                if getattr(self, name) != value:
                    raise UserError(f"model.dit.preset {self.preset} has {name} {value}, but model.dit.{name} is "
                                    f"{getattr(self, name)}; drop one of them (or set model.dit.preset=null to size "
                                    "the DiT by hand)")
        if self.hidden_size % self.num_heads or self.hidden_size % 4:
            raise UserError(f"model.dit.hidden_size={self.hidden_size} must be divisible by model.dit.num_heads="
                            f"{self.num_heads} and by 4")
        for name in ("hidden_size", "depth", "num_heads", "patch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"model.dit.{name} must be at least 1, got {getattr(self, name)}")


@dataclass
class UNetConfig:
    """A diffusers UNet built from scratch: one entry per resolution level."""

    block_out_channels: list[int] = field(default_factory=lambda: [64, 128, 128])
    layers_per_block: int = 2
    attention_levels: list[bool] = field(default_factory=lambda: [False, True, True])
    attention_head_dim: int = 8

    def check(self) -> None:
        channels, levels = self.block_out_channels, self.attention_levels
        if len(channels) != len(levels):
            raise UserError(f"model.unet.attention_levels has {len(levels)} entries but model.unet.block_out_channels "
                            f"has {len(channels)}; give one per level")
        if any(ch % self.attention_head_dim for ch, a in zip(channels, levels) if a):
            raise UserError(f"model.unet.block_out_channels {list(channels)} must be multiples of "
                            f"model.unet.attention_head_dim={self.attention_head_dim} at attention levels")


# The pretrained diffusers networks fine-tuning can drive (latentpatch.models.widen / pretrained_dit).
PRETRAINED_CLASSES = ("UNet2DModel", "UNet2DConditionModel", "DiTTransformer2DModel", "SD3Transformer2DModel",
                      "FluxTransformer2DModel")
# The flow-matching transformers (latentpatch.models.sd3 / flux): stock weights, no coordinate channels.
FLOW_CLASSES = ("SD3Transformer2DModel", "FluxTransformer2DModel")


@dataclass
class PretrainedConfig:
    """A pretrained diffusers network (written by fine-tuning): its class and diffusers config; the weights are in
    the run's checkpoints. UNets are widened by the coordinate channels (and DiTs were, in earlier runs that
    still load); DiTs, the flow transformers and SDXL's UNet stay stock."""

    class_name: str = ""  # one of PRETRAINED_CLASSES
    config: Any = None  # dict: the diffusers config.json of the network (in_channels C+2 where widened)
    # Pixels per latent pixel of the base's VAE (diffusers' vae_scale_factor), for a network conditioned in pixels
    # (SDXL's time ids: models/sdxl.py); 0: not used.
    vae_scale_factor: int = 0


def pretrained_latent_channels(pretrained: PretrainedConfig) -> tuple[int, ...]:
    """The latent channels a pretrained network can take (the first: what a fine-tune writes now): a widened UNet's
    inputs less the 2 coordinate channels; a DiT's own inputs (stock) or, in a run fine-tuned before, its inputs
    less the 2 it was widened by; an SD3 transformer's own; FLUX's packed 2x2 tokens, a quarter of its inputs; an
    SDXL UNet's outputs."""
    from latentpatch.models.sdxl import is_sdxl_unet

    in_channels = int(pretrained.config["in_channels"])
    if is_sdxl_unet({**pretrained.config, "_class_name": pretrained.class_name}):
        return (int(pretrained.config.get("out_channels") or in_channels),)
    if pretrained.class_name == "FluxTransformer2DModel":
        return (in_channels // 4,)
    if pretrained.class_name == "DiTTransformer2DModel":
        return in_channels, in_channels - 2
    return (in_channels,) if pretrained.class_name in FLOW_CLASSES else (in_channels - 2,)


def downsampling(config: Any) -> int:
    """The total downsampling of a diffusers UNet or VAE of this config: one halving per level after the first."""
    return 2 ** (len(config["block_out_channels"]) - 1)


def pretrained_multiple(pretrained: PretrainedConfig) -> int:
    """The side (latent pixels) a pretrained network's inputs divide into: a transformer's patch (FLUX: its 2x2
    packing), a UNet's downsampling (one per level: SDXL's 4, SD 1.x/2.x's 8). Read from the config, so that a
    bucket step can be chosen before any weights are loaded."""
    config = pretrained.config
    if pretrained.class_name == "FluxTransformer2DModel":
        return 2  # FluxPipeline packs 2x2 latent pixels into a token (models/flux.py, FLUX_PACKING)
    if config.get("patch_size"):
        return int(config["patch_size"])
    return downsampling(config)


@dataclass
class ModelConfig:
    """Which denoiser to build and how big; conditioning widths are shared by every architecture."""

    arch: str = "dit"                      # "dit" | "unet" | "pretrained" (a widened diffusers UNet or DiT)
    dit: DiTConfig = field(default_factory=DiTConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    pretrained: PretrainedConfig = field(default_factory=PretrainedConfig)
    num_classes: int = 0                   # 0 = unconditional; else label num_classes is the null label
    text_dim: int = 0                      # >0: cross-attention on text tokens of this width
    pooled_text_dim: int = 0               # >0: pooled text embedding added to the adaLN / time embedding
    attention: str = "auto"                # "auto" | "sdpa" | "xformers"
    grad_checkpointing: bool = False
    lora_rank: int = 0                     # >0: LoRA adapters of this rank on attention projections; base frozen

    def check(self) -> None:
        if self.arch not in ARCHS:
            raise UserError(f"model.arch: unknown architecture {self.arch!r}; choose {', '.join(ARCHS)}")
        if self.attention not in ATTENTION:
            raise UserError(f"model.attention: unknown backend {self.attention!r}; choose auto, sdpa or xformers")
        for name in ("num_classes", "text_dim", "pooled_text_dim", "lora_rank"):
            if getattr(self, name) < 0:
                raise UserError(f"model.{name} must be >= 0, got {getattr(self, name)}")
        if self.arch == "dit":
            self.dit.check()
        elif self.arch == "unet":
            self.unet.check()
            if self.pooled_text_dim > 0 and self.text_dim == 0:
                raise UserError("arch=unet takes model.pooled_text_dim only together with model.text_dim > 0")
        elif not isinstance(self.pretrained.config, dict) or not self.pretrained.class_name:
            raise UserError("model.arch=pretrained needs model.pretrained.class_name and .config (written by "
                            "fine-tuning a diffusers base)")
        elif self.pretrained.class_name not in PRETRAINED_CLASSES:
            raise UserError(f"model.pretrained.class_name is {self.pretrained.class_name!r}; expected one of "
                            f"{', '.join(PRETRAINED_CLASSES)}")


# Keys of the flat model section written before the per-architecture sections (runs of latentpatch 0.1).
LEGACY_KEYS = {**{k: ("dit", k) for k in (*PRESET_FIELDS, "preset", "mlp_ratio")},
               **{f"unet_{k}": ("unet", k) for k in ("block_out_channels", "layers_per_block", "attention_levels",
                                                      "attention_head_dim")}}


def migrate_legacy(model: dict[str, Any]) -> dict[str, Any]:
    """A flat model section (hidden_size, unet_block_out_channels, unet_config, ...) in today's layout."""
    model = dict(model)
    for old, (section, new) in LEGACY_KEYS.items():
        if old in model:
            model.setdefault(section, {})[new] = model.pop(old)
    unet_config = model.pop("unet_config", None)
    if unet_config is not None:
        model["arch"] = "pretrained"
        model["pretrained"] = {"class_name": unet_config.get("_class_name", ""), "config": unet_config}
    return model
