"""Pretrained diffusers bases for fine-tuning: a pipeline folder or hub id, or a bare model folder, read into
the parts a run needs (the network, its noise schedule, the autoencoder, the text encoder).

    pipeline/            (a folder, or a hub id with the same files in the Hugging Face cache)
      unet/ or transformer/   the denoiser: UNet2DModel, UNet2DConditionModel or DiTTransformer2DModel
      scheduler/              scheduler_config.json: the DDPM schedule, read by edm.precond "vp"
      vae/                    the run's default autoencoder
      text_encoder/ tokenizer/   the pipeline's own text encoder (with the transformers extra)

A bare model folder (config.json + weights) has no schedule of its own unless its parent is a pipeline; it is
then fine-tuned with EDM's preconditioning, so it adapts from the first step (docs/finetuning.md).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from latentpatch.errors import UserError
from latentpatch.hub import load_kwargs
from latentpatch.models.model_config import FLOW_CLASSES, PRETRAINED_CLASSES, downsampling

NETWORK_FOLDERS = ("unet", "transformer")
SUPPORTED = PRETRAINED_CLASSES  # the classes a run can hold (model.arch=pretrained), named once
PIXART = ("PixArtTransformer2DModel",)
NO_POSITIONS = ("SanaTransformer2DModel",)  # transformers with no position encoding to carry a crop's place
TRANSFORMER2D_REMAP = {"ada_norm_zero": "DiTTransformer2DModel", "ada_norm_single": "PixArtTransformer2DModel"}


@dataclass(frozen=True)
class TextChoice:
    """A text encoder as TextConfig names it, and why it was chosen (recorded in finetune.json)."""

    model: str
    pretrained: str | None
    layer: str
    padding: str
    reason: str


# open_clip towers whose features match Stable Diffusion's, by the UNet's cross_attention_dim. SD 1.x: OpenAI
# CLIP ViT-L/14 (QuickGELU: open_clip's plain ViT-L-14 runs GELU), last layer after the final norm, padded with
# end-of-text; SD 2.x: OpenCLIP ViT-H/14, penultimate layer then the final norm, padded with 0. Both attend to
# all 77 positions, as the pipelines do.
SD_TEXT = {
    768: TextChoice("ViT-L-14-quickgelu", "openai", "last", "eot", "Stable Diffusion 1.x: OpenAI CLIP ViT-L/14"),
    1024: TextChoice("ViT-H-14", "laion2b_s32b_b79k", "penultimate", "zero",
                     "Stable Diffusion 2.x: OpenCLIP ViT-H/14, penultimate layer"),
}


@dataclass
class DiffusersBase:
    """What a diffusers base provides; `root` is the pipeline folder (resolved) or hub id, or the bare folder."""

    source: str
    root: str
    subfolder: str | None  # where the network is inside root (unet / transformer), None for a bare folder
    config: dict[str, Any]  # the network's config.json
    scheduler: dict[str, Any] | None  # scheduler/scheduler_config.json (None: no schedule)
    has_vae: bool
    text_encoder: dict[str, Any] | None  # text_encoder/config.json
    has_tokenizer: bool
    vae_config: dict[str, Any] | None

    @property
    def class_name(self) -> str:
        """The diffusers class; an old Transformer2DModel config is remapped by its norm_type, as diffusers does
        (facebook/DiT-XL-2-256 is one)."""
        name = self.config.get("_class_name", "")
        if name == "Transformer2DModel":
            return TRANSFORMER2D_REMAP.get(self.config.get("norm_type"), name)
        return name

    @property
    def is_pipeline(self) -> bool:
        return self.subfolder is not None

    def load_network(self, revision: str | None = None) -> nn.Module:
        """The pretrained network in its own, aligned memory (tensors read from a file may sit at unaligned
        offsets, which changes the CPU kernels' rounding)."""
        import diffusers
        import torch

        try:
            net = getattr(diffusers, self.class_name).from_pretrained(self.root, subfolder=self.subfolder,
                                                                      revision=revision, **load_kwargs())
        except (OSError, ValueError) as e:
            raise UserError(f"could not load the {self.class_name} of {self.source}: {e}") from e
        with torch.no_grad():
            for p in net.parameters():
                p.data = p.data.clone()
        return net

    def default_resolution(self) -> int | None:
        """The pixel size the network was trained at: its sample_size times the VAE's downsampling."""
        size = self.config.get("sample_size")
        blocks = (self.vae_config or {}).get("block_out_channels")
        if not isinstance(size, int) or not blocks:
            return None
        return size * downsampling(self.vae_config)

    def default_text(self) -> TextChoice | None:
        """The pipeline's own encoder when transformers can serve it, else the matching open_clip tower; an SD3 /
        FLUX pipeline's own encoders (CLIP and T5), which nothing else can stand for."""
        from latentpatch.text.identity import TRANSFORMERS_PREFIX

        if self.class_name in FLOW_CLASSES:
            if not _has_transformers():
                raise UserError(f"the {self.class_name}'s text encoders (CLIP and T5) load through transformers: "
                                "pip install 'latentpatch[transformers]'")
            return TextChoice(TRANSFORMERS_PREFIX + self.root, None, "last", "pipeline",
                              "the pipeline's own text encoders (transformers)")
        if self.class_name != "UNet2DConditionModel":
            return None
        if self.text_encoder is not None and self.has_tokenizer and _has_transformers():
            return TextChoice(TRANSFORMERS_PREFIX + self.root, None, "last", self.tokenizer_padding(),
                              "the pipeline's own text encoder (transformers)")
        width = self.config.get("cross_attention_dim")
        if width not in SD_TEXT:
            raise UserError(f"the base UNet's cross_attention_dim is {width}, which no Stable Diffusion text encoder "
                            "has; pass text_encoder= (--text-encoder) of that width")
        return SD_TEXT[width]

    def tokenizer_padding(self) -> str:
        from latentpatch.text.identity import TRANSFORMERS_PREFIX
        from latentpatch.text.pipeline_encoder import pipeline_padding

        return pipeline_padding(TRANSFORMERS_PREFIX + self.root)


def _has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True


def _read(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"could not read {path}: {e}") from e


def resolve_base(source: str, revision: str | None = None) -> DiffusersBase:
    """Read a diffusers base (folder or hub id); UserError for anything fine-tuning cannot drive."""
    path = Path(source).expanduser()
    base = _local_base(source, path) if path.exists() else _hub_base(source, revision)
    _check_class(base)
    return base


def _local_base(source: str, path: Path) -> DiffusersBase:
    path = path.resolve()
    if (path / "config.json").is_file():
        parent = path.parent
        if path.name in NETWORK_FOLDERS and (parent / "scheduler" / "scheduler_config.json").is_file():
            root, subfolder = parent, path.name  # pipeline/unet given: the pipeline is the base
        else:
            root, subfolder = path, None
    else:
        found = [f for f in NETWORK_FOLDERS if (path / f / "config.json").is_file()]
        if not found:
            raise UserError(f"{source} is not a diffusers model or pipeline folder: it has no config.json, "
                            "unet/config.json nor transformer/config.json")
        root, subfolder = path, found[0]
    net_dir = root / subfolder if subfolder else root
    pipeline = subfolder is not None
    return DiffusersBase(
        source=source, root=str(root), subfolder=subfolder, config=_read(net_dir / "config.json"),
        scheduler=_read(root / "scheduler" / "scheduler_config.json") if pipeline else None,
        has_vae=pipeline and (root / "vae" / "config.json").is_file(),
        text_encoder=_read(root / "text_encoder" / "config.json") if pipeline else None,
        has_tokenizer=pipeline and (root / "tokenizer").is_dir(),
        vae_config=_read(root / "vae" / "config.json") if pipeline else None,
    )


def _hub_json(repo: str, filename: str, subfolder: str | None, revision: str | None) -> dict[str, Any] | None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import HfHubHTTPError

    try:
        return json.loads(Path(hf_hub_download(repo, filename, subfolder=subfolder, revision=revision)).read_text())
    except (OSError, ValueError, HfHubHTTPError):
        return None


def _hub_base(source: str, revision: str | None) -> DiffusersBase:
    """A hub id: a pipeline (model_index.json names its parts) or a bare model (config.json)."""
    index = _hub_json(source, "model_index.json", None, revision)
    if index is not None:
        subfolder = next((f for f in NETWORK_FOLDERS if f in index), None)
        config = _hub_json(source, "config.json", subfolder, revision) if subfolder else None
        if config is None:
            raise UserError(f"the pipeline {source} has no unet/ or transformer/ that could be read")
        return DiffusersBase(
            source=source, root=source, subfolder=subfolder, config=config,
            scheduler=_hub_json(source, "scheduler_config.json", "scheduler", revision) if "scheduler" in index else None,
            has_vae="vae" in index,
            text_encoder=_hub_json(source, "config.json", "text_encoder", revision) if "text_encoder" in index else None,
            has_tokenizer="tokenizer" in index,
            vae_config=_hub_json(source, "config.json", "vae", revision) if "vae" in index else None,
        )
    config = _hub_json(source, "config.json", None, revision)
    if config is None:
        raise UserError(
            f"base {source!r} is neither a latentpatch run folder, a local diffusers folder, nor a hub id that could "
            "be fetched (offline? HF_HUB_OFFLINE=1 needs it in the cache)"
        )
    return DiffusersBase(source=source, root=source, subfolder=None, config=config, scheduler=None, has_vae=False,
                         text_encoder=None, has_tokenizer=False, vae_config=None)


def _check_class(base: DiffusersBase) -> None:
    name = base.class_name
    flow_scheduler = base.scheduler is not None and base.scheduler.get("_class_name", "").startswith("FlowMatch")
    if name in NO_POSITIONS:
        raise UserError(f"{base.source} holds a {name}, whose transformer has no position encoding a crop could carry "
                        "its place through (linear attention, no position table or rotary ids), and latentpatch does "
                        "not yet give it coordinate channels; it cannot be fine-tuned with patches here")
    if name in PIXART or base.config.get("caption_channels"):
        raise UserError(
            f"{base.source} is a PixArt-style transformer ({name}); its text path (T5-XXL features through "
            "transformers, 120 tokens, and the resolution/aspect-ratio conditioning of the 1024 px models) is not "
            "served by latentpatch, so it cannot be fine-tuned here. Fine-tune a UNet2DConditionModel (Stable "
            "Diffusion 1.x/2.x) or a class-conditional DiTTransformer2DModel (DiT-XL/2)"
        )
    if name not in SUPPORTED:
        raise UserError(f"{base.source} holds a {name or 'model without _class_name'}; fine-tuning supports "
                        f"{', '.join(SUPPORTED)}")
    if name in FLOW_CLASSES:
        if not (base.is_pipeline and flow_scheduler and base.has_vae):
            raise UserError(f"a {name} is fine-tuned from its pipeline folder (StableDiffusion3Pipeline / FluxPipeline: "
                            "transformer/, a FlowMatchEulerDiscreteScheduler in scheduler/, vae/ and its text "
                            f"encoders); {base.source} is not one")
    elif flow_scheduler:
        raise UserError(f"{base.source} is a flow-matching model ({base.scheduler['_class_name']}) with a {name}; "
                        "flow matching is served for SD3Transformer2DModel and FluxTransformer2DModel, edm.precond=vp "
                        "for DDPM-style (epsilon / v_prediction / sample) models")
