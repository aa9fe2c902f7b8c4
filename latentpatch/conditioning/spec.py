"""What a run is conditioned on, decided once from the config and the latent store, recorded in run.json.

Every stage asks the spec, never the config or the store again: training draws its conditioning rows by
it, sampling checks prompts and class labels against it, evaluation scores held-out rows with it.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from latentpatch.errors import UserError

if TYPE_CHECKING:
    from latentpatch.config import RunConfig
    from latentpatch.data.store import LatentStore
    from latentpatch.text.open_clip_encoder import TextEncoder

NO_TEXT = "none"  # text.model value that trains without text even on a store with cached embeddings


@dataclass(frozen=True)
class ConditioningSpec:
    """Class labels (0 = none) and the text encoder (None = not text-conditioned) of a run."""

    num_classes: int = 0
    class_names: tuple[str, ...] | None = None
    text_encoder: dict[str, Any] | None = None  # latentpatch.text record: the encoder prompts must go through
    pooled: bool = False  # the pooled text embedding is fed too (adaLN / the UNet's time embedding)

    @property
    def text(self) -> bool:
        return self.text_encoder is not None

    @property
    def conditional(self) -> bool:
        return self.text or self.num_classes > 0

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["class_names"] = None if self.class_names is None else list(self.class_names)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ConditioningSpec:
        names = d.get("class_names")
        return cls(int(d.get("num_classes") or 0), None if names is None else tuple(names),
                   d.get("text_encoder"), bool(d.get("pooled", False)))


def spec_from_run(info: dict[str, Any], cfg: RunConfig) -> ConditioningSpec:
    """The spec of a run folder: run.json's `conditioning`; runs written before it existed are read from
    their top-level keys, trusting the model config on text (such runs copied a store's encoder even when
    trained with text.model=none)."""
    if "conditioning" in info:
        return ConditioningSpec.from_dict(info["conditioning"])
    model = cfg.model
    text = model.text_dim > 0 or model.pooled_text_dim > 0
    names = info.get("class_names")
    return ConditioningSpec(int(info.get("num_classes") or model.num_classes or 0),
                            None if names is None else tuple(names),
                            info.get("text_encoder") if text else None, model.pooled_text_dim > 0)


@dataclass
class TextSource:
    """Where a training run's text embeddings come from: the store's cache, or the encoder run once."""

    record: dict[str, Any]
    cached: bool
    encoder: TextEncoder | None = None

    def get_encoder(self) -> TextEncoder:
        if self.encoder is None:
            from latentpatch.text.loader import load_text_encoder_from_record

            self.encoder = load_text_encoder_from_record(self.record)
        return self.encoder


def derive_spec(cfg: RunConfig, store: LatentStore) -> tuple[RunConfig, ConditioningSpec, TextSource | None]:
    """The config with model.text_dim / pooled_text_dim set from the encoder, the spec, and the text source.

    An empty text.model adopts the store's cached encoder, so `encode --text-encoder` then `train` just
    works; text.model=none trains without text on any store.
    """
    from latentpatch.text.identity import cache_serves, record_features
    from latentpatch.text.loader import load_text_encoder

    names = store.manifest.class_names
    classes = cfg.model.num_classes
    recorded = store.manifest.text_encoder
    tc = cfg.text
    if tc.model == NO_TEXT or (not tc.model and recorded is None):
        if cfg.model.text_dim > 0 or cfg.model.pooled_text_dim > 0:
            raise UserError(f"model.text_dim={cfg.model.text_dim} needs a text encoder: set text.model (an open_clip "
                            f"model) or encode {store.path} with --text-encoder")
        return cfg, ConditioningSpec(classes, _names(names, classes)), None
    cfg = copy.deepcopy(cfg)
    tc = cfg.text
    if not tc.model:
        tc.model, tc.pretrained, tc.max_length = recorded["model"], recorded["pretrained"], recorded["max_length"]
        tc.layer, tc.padding = record_features(recorded)
    _check_captions(store, tc.model)
    if cache_serves(recorded, tc.model, tc.pretrained, tc.max_length, tc.layer, tc.padding):
        source = TextSource(recorded, cached=True)
    else:
        encoder = load_text_encoder(tc.model, tc.pretrained, max_length=tc.max_length, layer=tc.layer,
                                    padding=tc.padding)
        source = TextSource(encoder.record, cached=False, encoder=encoder)
    apply_text_dims(cfg, source.record)
    spec = ConditioningSpec(classes, _names(names, classes), source.record, cfg.model.pooled_text_dim > 0)
    return cfg, spec, source


def _names(names: list[str] | None, classes: int) -> tuple[str, ...] | None:
    """The store's class names, one per class; a pretrained model with more classes than the store names
    (DiT-XL/2's 1000) keeps its label numbers as the names of the rest."""
    if names is None or classes == 0:
        return None
    return tuple(names) + tuple(str(k) for k in range(len(names), classes))


def _check_captions(store: LatentStore, model: str) -> None:
    missing = [item.file for item in store.items if item.caption is None]
    if missing:
        examples = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise UserError(
            f"the run is text-conditioned (text.model={model}) but {len(missing)} of {len(store)} items of "
            f"{store.path} have no caption ({examples}); give each image a caption (NAME.txt beside it, or "
            "metadata.jsonl with file_name and text) and rerun `latentpatch encode`, or set text.model=none"
        )


def apply_text_dims(cfg: RunConfig, record: dict[str, Any]) -> None:
    """model.text_dim = the token width and pooled_text_dim = the pooled width (if text.pooled); 0 means auto."""
    from latentpatch.text.identity import describe

    model, width = cfg.model, int(record["width"])
    pooled = int(record["pooled_dim"]) if cfg.text.pooled else 0
    if model.text_dim == 0:
        model.text_dim = width
    if model.pooled_text_dim == 0:
        model.pooled_text_dim = pooled
    if model.text_dim != width:
        raise UserError(f"model.text_dim={model.text_dim} but {describe(record)} gives tokens of width {width}; "
                        f"set model.text_dim={width} (or 0: taken from the encoder)")
    if model.pooled_text_dim != pooled:
        raise UserError(f"model.pooled_text_dim={model.pooled_text_dim} but the text encoder's pooled embedding "
                        f"is {pooled} wide with text.pooled={cfg.text.pooled}; set model.pooled_text_dim=0 (auto)")
