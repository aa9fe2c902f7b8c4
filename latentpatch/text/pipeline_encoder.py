"""A diffusers pipeline's own text encoder (transformers CLIPTextModel + CLIPTokenizer), frozen, behind the
TextEncoder interface: `text.model = "transformers:PIPELINE"` (a pipeline folder or hub id with text_encoder/
and tokenizer/). Needs the optional `transformers` extra.

Stable Diffusion's pipelines pad every prompt to 77 tokens and let the UNet attend to all of them, and SD 2.x's
converted encoder already stops at the penultimate layer; so the default features are `layer` "last" with the
tokenizer's own padding attended ("eot" for SD 1.x, "zero" for SD 2.x: see `padding_of`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

from latentpatch.errors import UserError
from latentpatch.text.identity import TRANSFORMERS_PREFIX, need_transformers, split_source
from latentpatch.text.open_clip_encoder import TextEncoder

SUPPORTED = ("CLIPTextModel",)


def text_encoder_config(source: str) -> dict[str, Any] | None:
    """text_encoder/config.json of a local pipeline folder (None for a hub id or a folder without one)."""
    path = Path(source) / "text_encoder" / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def padding_of(tokenizer: Any) -> str:
    """The padding a pipeline's tokenizer applies: its pad token is the end-of-text token (SD 1.x) or id 0 (SD 2.x)."""
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        return "eot"
    if tokenizer.pad_token_id == 0:
        return "zero"
    raise UserError(f"the pipeline's tokenizer pads with id {tokenizer.pad_token_id}, neither end-of-text nor 0; "
                    "latentpatch cannot reproduce it")


def pipeline_padding(model: str) -> str:
    """The padding of the tokenizer of "transformers:SOURCE" (loads the tokenizer only); an SD3 / FLUX pipeline's
    encoders have their own ("pipeline": latentpatch.text.flow_encoder)."""
    from latentpatch.text.flow_encoder import PIPELINE_PADDING, flow_pipeline_class

    transformers = need_transformers()
    source = split_source(model)
    if flow_pipeline_class(source) is not None:
        return PIPELINE_PADDING
    try:
        tokenizer = transformers.CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the tokenizer of {source}: {e}") from e
    return padding_of(tokenizer)


class PipelineTextEncoder(TextEncoder):
    """transformers CLIPTextModel and CLIPTokenizer; the same outputs and records as the open_clip encoder."""

    def tokenize(self, texts: Sequence[str]) -> Tensor:
        """Token ids [N, max_length] (the tokenizer's own padding); longer text is cut with a warning."""
        texts = list(texts)
        for text in texts:
            self._warn_if_cut(text, len(self.tokenizer(text, truncation=False).input_ids))
        return self.tokenizer(texts, padding="max_length", max_length=self.max_length, truncation=True,
                              return_tensors="pt").input_ids

    def _end_of_text(self) -> int:
        return self.tokenizer.eos_token_id  # also its padding for SD 1.x (see padding_of)

    def _forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """last_hidden_state (after final_layer_norm), or the penultimate hidden state through it (clip_skip 1)."""
        out = self.model(input_ids=ids, output_hidden_states=self.layer == "penultimate")
        if self.layer == "last":
            return out.last_hidden_state, out.pooler_output
        final_norm = getattr(self.model, "text_model", self.model).final_layer_norm  # transformers 4 nests it
        return final_norm(out.hidden_states[-2]), out.pooler_output


def load_pipeline_text_encoder(
    model: str, *, max_length: int | None, device: torch.device, layer: str, padding: str,
) -> PipelineTextEncoder:
    """The text_encoder/ and tokenizer/ of the pipeline `model` names ("transformers:SOURCE")."""
    from latentpatch.hub import transformers_load_kwargs

    transformers = need_transformers()
    source = split_source(model)
    local = Path(source).expanduser()
    if local.exists():
        if not (local / "text_encoder" / "config.json").is_file() or not (local / "tokenizer").is_dir():
            raise UserError(f"{source} has no text_encoder/ and tokenizer/: it is not a pipeline with its own text "
                            "encoder; name an open_clip tower instead")
        source = str(local.resolve())
    config = text_encoder_config(source) or {}
    arch = (config.get("architectures") or ["CLIPTextModel"])[0]
    if arch not in SUPPORTED:
        raise UserError(f"the pipeline's text encoder is a {arch}; latentpatch serves {', '.join(SUPPORTED)} "
                        "(Stable Diffusion 1.x / 2.x)")
    try:
        tokenizer = transformers.CLIPTokenizer.from_pretrained(source, subfolder="tokenizer")
        net = transformers.CLIPTextModel.from_pretrained(source, subfolder="text_encoder",
                                                         **transformers_load_kwargs())
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the text encoder of {source}: {e}") from e
    net = net.to(device).eval().requires_grad_(False)
    context_length = int(net.config.max_position_embeddings)
    max_length = min(context_length, int(tokenizer.model_max_length)) if max_length is None else int(max_length)
    if not 1 <= max_length <= context_length:
        raise UserError(f"text.max_length={max_length} must be between 1 and the encoder's context length "
                        f"{context_length}")
    files = None
    if local.exists():
        from latentpatch.autoencoders import folder_revision

        files = folder_revision(Path(source) / "text_encoder")
    record = {
        "library": "transformers", "model": TRANSFORMERS_PREFIX + source, "pretrained": None,
        "weights_sha256": None, "config_sha256": None, "files_sha256": files, "max_length": max_length,
        "context_length": context_length, "width": int(net.config.hidden_size),
        "pooled_dim": int(net.config.hidden_size), "tokenizer": type(tokenizer).__name__, "layer": layer,
        "padding": padding,
    }
    return PipelineTextEncoder(net, tokenizer, record, device)
