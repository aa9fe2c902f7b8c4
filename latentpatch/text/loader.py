"""One loader for every text encoder: an open_clip tower by name, a diffusers pipeline's own CLIP text model, or
an SD3 / FLUX pipeline's text encoders ("transformers:PIPELINE"). The encoders never import each other; this
module chooses between them."""

from __future__ import annotations

from typing import Any

import torch

from latentpatch.device import resolve_device
from latentpatch.errors import UserError
from latentpatch.text.config import check_features
from latentpatch.text.flow_encoder import PIPELINE_PADDING, flow_pipeline_class, load_flow_text_encoder
from latentpatch.text.identity import FEATURE_DEFAULTS, TRANSFORMERS_PREFIX, record_features
from latentpatch.text.open_clip_encoder import TextEncoder, load_open_clip_encoder


def load_text_encoder(
    model: str, pretrained: str | None = None, *, max_length: int | None = None,
    device: torch.device | str | None = None, layer: str | None = None, padding: str | None = None,
) -> TextEncoder:
    """A frozen text tower. `model` is an open_clip name (or a model config `.json`
    file), `pretrained` a tag, a checkpoint file, or None for random weights (seeded, for tests);
    `max_length` tokens are kept (default: the model's context length, 77 for CLIP). `layer` and `padding`:
    TextConfig's (None: the encoder's own, FEATURE_DEFAULTS but for SD3 / FLUX's "pipeline"). "transformers:PIPELINE"
    is a diffusers pipeline's own encoder (latentpatch.text.pipeline_encoder; SD3 / FLUX: text.flow_encoder)."""

    if not model:
        raise UserError("no text encoder given (text.model is empty)")
    device = resolve_device(device)
    if model.startswith(TRANSFORMERS_PREFIX):
        from latentpatch.text.identity import split_source

        if flow_pipeline_class(split_source(model)) is not None:
            return load_flow_text_encoder(model, max_length=max_length, device=device, layer=layer, padding=padding)
    layer, padding = layer or FEATURE_DEFAULTS["layer"], padding or FEATURE_DEFAULTS["padding"]
    check_features(layer, padding)
    if padding == PIPELINE_PADDING:
        raise UserError(f"text.padding={PIPELINE_PADDING} is the padding of an SD3 / FLUX pipeline's own text "
                        f"encoders; {model} is not one")
    if model.startswith(TRANSFORMERS_PREFIX):
        from latentpatch.text.pipeline_encoder import load_pipeline_text_encoder

        return load_pipeline_text_encoder(model, max_length=max_length, device=device, layer=layer, padding=padding)
    return load_open_clip_encoder(model, pretrained, max_length=max_length, device=device, layer=layer,
                                  padding=padding)


def load_text_encoder_from_record(record: dict[str, Any], device: torch.device | str | None = None) -> TextEncoder:
    """The encoder a store manifest or run.json names; refuses one whose weights or config file changed."""
    layer, padding = record_features(record)
    encoder = load_text_encoder(record["model"], record.get("pretrained"), max_length=int(record["max_length"]),
                                device=device, layer=layer, padding=padding)
    for key in ("weights_sha256", "config_sha256", "files_sha256"):
        if record.get(key) != encoder.record.get(key):
            raise UserError(
                f"the text encoder file for {record['model']!r} ({record.get('pretrained') or 'config'}) changed "
                f"since it was recorded ({key} {str(record.get(key))[:12]} -> {str(encoder.record.get(key))[:12]}); "
                "restore it or re-encode"
            )
    return encoder
