"""Which text encoder a record names: parsing `--text-encoder`, comparing records, describing one.

One home for "are these the same text features?": the store's cache, the run's conditioning spec and `eval`
all ask `same_text_encoder`, so a store's last-layer embeddings are never taken for penultimate-layer ones.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from latentpatch.errors import UserError

TRANSFORMERS_PREFIX = "transformers:"  # text.model "transformers:PIPELINE": a diffusers pipeline's own encoder


def parse_text_encoder(spec: str) -> tuple[str, str | None]:
    """`MODEL[:PRETRAINED]` -> (model, pretrained); an `hf-hub:`/`local-dir:` model keeps its whole name."""
    spec = spec.strip()
    if not spec:
        raise UserError("--text-encoder is empty; give an open_clip model such as ViT-B-32:laion2b_s34b_b79k")
    if spec.startswith(("hf-hub:", "local-dir:", TRANSFORMERS_PREFIX)):
        return spec, None
    model, _, pretrained = spec.partition(":")
    return model, pretrained or None


IDENTITY_KEYS = ("model", "pretrained", "weights_sha256", "config_sha256", "max_length", "layer", "padding")
FEATURE_DEFAULTS = {"layer": "last", "padding": "masked"}  # what records written before these keys mean


def same_text_encoder(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Whether two records name the same encoder: by weights hash when both are files, else by name and tag."""
    if a is None or b is None:
        return a is b
    keys = list(IDENTITY_KEYS)
    if a.get("weights_sha256") and b.get("weights_sha256"):
        keys.remove("pretrained")  # the same file wherever it now lives
    if a.get("config_sha256") and b.get("config_sha256"):
        keys.remove("model")
    return all(a.get(k, FEATURE_DEFAULTS.get(k)) == b.get(k, FEATURE_DEFAULTS.get(k)) for k in keys)


def describe(record: dict[str, Any]) -> str:
    if str(record["model"]).startswith(TRANSFORMERS_PREFIX):
        name, weights = record["model"], "its own weights"
    else:
        name, weights = os.path.basename(str(record["model"])), record.get("pretrained") or "random weights"
    features = [f"{k} {record[k]}" for k, default in FEATURE_DEFAULTS.items() if record.get(k, default) != default]
    return f"{name}:{weights} (max_length {record['max_length']}{''.join(', ' + f for f in features)})"


def caption_hash(caption: str | None) -> int:
    """A 63-bit fingerprint of a caption (0 for none), stored beside each cached embedding row."""
    if caption is None:
        return 0
    return 1 + (int.from_bytes(hashlib.sha256(caption.encode()).digest()[:8], "little") & (2**62 - 1))


def text_identity(model: str, pretrained: str | None, max_length: int, layer: str, padding: str) -> dict[str, Any]:
    """The record keys that identify an encoder and its features, computed from a config without loading it."""
    from latentpatch.io import sha256_file

    config_sha = None
    if model.endswith(".json") and Path(model).is_file():
        config_sha = sha256_file(model)
        model = str(Path(model).resolve())
    weights_sha = None
    if pretrained is not None and Path(pretrained).is_file():
        weights_sha, pretrained = sha256_file(pretrained), str(Path(pretrained).resolve())
    return {"model": model, "pretrained": pretrained, "weights_sha256": weights_sha, "config_sha256": config_sha,
            "max_length": int(max_length), "layer": layer, "padding": padding}


def cache_serves(cached: dict[str, Any] | None, model: str, pretrained: str | None, max_length: int, layer: str,
                 padding: str) -> bool:
    """Whether a store's cached embeddings (its manifest's record `cached`) are the features a run's text config
    asks for (`derive_spec`); with a whole record at hand (`eval`'s held-out set) `same_text_encoder` answers it.
    Layer and padding have no defaults: leaving them out is how two copies of this question once disagreed."""
    return cached is not None and same_text_encoder(cached, text_identity(model, pretrained, max_length, layer,
                                                                          padding))


def record_features(record: dict[str, Any]) -> tuple[str, str]:
    """(layer, padding) of a record; records written before these keys mean FEATURE_DEFAULTS."""
    return record.get("layer", FEATURE_DEFAULTS["layer"]), record.get("padding", FEATURE_DEFAULTS["padding"])


def need_transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise UserError("a pipeline's own text encoder needs transformers: pip install 'latentpatch[transformers]' "
                        "(or name an open_clip tower with --text-encoder)") from e
    return transformers


def split_source(model: str) -> str:
    """The pipeline folder or hub id of a "transformers:SOURCE" text.model."""
    source = model[len(TRANSFORMERS_PREFIX):].strip()
    if not source:
        raise UserError(f"text.model {model!r} names no pipeline; use transformers:PIPELINE_FOLDER_OR_HUB_ID")
    return source
