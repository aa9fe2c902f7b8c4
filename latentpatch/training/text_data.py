"""Text conditioning for a training run: which encoder, the model's text widths, the embeddings in memory.

Embeddings come from the latent store's cache when the configured encoder made it; otherwise the encoder
embeds every distinct caption once at the start (captions are few). Either way it never runs per step.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from latentpatch.config import RunConfig
from latentpatch.data.store import TORCH_DTYPES, LatentStore
from latentpatch.data.text_cache import cached_rows, read_null, text_identity
from latentpatch.errors import UserError
from latentpatch.io import write_json_atomic
from latentpatch.models.conditioning import Conditioning
from latentpatch.text import (
    TextEmbeddings, TextEncoder, describe, load_text_encoder, load_text_encoder_from_record, same_text_encoder,
)

NO_TEXT = "none"  # text.model value that trains without text even on a store with cached embeddings


@dataclass
class RunText:
    record: dict[str, Any]  # the encoder's record, kept in run.json for sampling
    cached: bool  # the store's cached embeddings serve
    encoder: TextEncoder | None = None  # loaded only when the cache cannot serve


def prepare_text(cfg: RunConfig, store: LatentStore) -> tuple[RunConfig, RunText | None]:
    """The config with model.text_dim / pooled_text_dim set from the encoder, and where embeddings come from.

    An empty text.model adopts the store's cached encoder, so `encode --text-encoder` then `train` just works.
    """
    recorded = store.meta.text_encoder
    if cfg.text.model == NO_TEXT or (not cfg.text.model and recorded is None):
        return cfg, None
    cfg = copy.deepcopy(cfg)
    tc = cfg.text
    if not tc.model:
        tc.model, tc.pretrained, tc.max_length = recorded["model"], recorded["pretrained"], recorded["max_length"]
    if not 0.0 <= tc.caption_dropout <= 1.0:
        raise UserError(f"text.caption_dropout must be in [0, 1], got {tc.caption_dropout}")
    check_captions(store, tc.model)
    if recorded is not None and same_text_encoder(recorded, text_identity(tc.model, tc.pretrained, tc.max_length)):
        text = RunText(recorded, cached=True)
    else:
        encoder = load_text_encoder(tc.model, tc.pretrained, max_length=tc.max_length)
        text = RunText(encoder.record, cached=False, encoder=encoder)
    apply_text_dims(cfg, text.record)
    return cfg, text


def check_captions(store: LatentStore, model: str) -> None:
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


def training_text_tensors(
    text: RunText, store: LatentStore, tensors: dict[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Per-row text_* tensors and the empty caption's null_text_* [1, ...], cut to the longest caption."""
    captions = store.captions
    dtype = TORCH_DTYPES[store.meta.dtype]
    if text.cached:
        emb, stale = cached_rows(tensors, captions)
        null = read_null(store.path)
        if stale:  # captions edited after encoding: embed just those rows again
            fresh = _encoder(text).encode([captions[i] for i in stale])
            emb.tokens[stale], emb.mask[stale] = fresh.tokens.to(emb.tokens.dtype), fresh.mask
            emb.pooled[stale] = fresh.pooled.to(emb.pooled.dtype)
    else:
        unique = sorted(set(captions))
        every = _encoder(text).encode(unique + [""])
        position = {c: i for i, c in enumerate(unique)}
        index = torch.tensor([position[c] for c in captions], dtype=torch.long)
        emb = TextEmbeddings(every.tokens[index], every.mask[index], every.pooled[index])
        null = TextEmbeddings(every.tokens[-1:], every.mask[-1:], every.pooled[-1:])
    length = max(int(emb.mask.sum(1).max()), int(null.mask.sum(1).max()))
    return {
        "text_tokens": emb.tokens[:, :length].to(dtype), "text_mask": emb.mask[:, :length].bool(),
        "text_pooled": emb.pooled.to(dtype),
        "null_text_tokens": null.tokens[:, :length].to(dtype), "null_text_mask": null.mask[:, :length].bool(),
        "null_text_pooled": null.pooled.to(dtype),
    }


def _encoder(text: RunText) -> TextEncoder:
    if text.encoder is None:
        text.encoder = load_text_encoder_from_record(text.record)
    return text.encoder


def record_in_run(run_dir: Path, record: dict[str, Any]) -> None:
    """run.json's text_encoder: the encoder sampling must load to embed prompts."""
    path = Path(run_dir) / "run.json"
    info = json.loads(path.read_text())
    if info.get("text_encoder") != record:
        info["text_encoder"] = record
        write_json_atomic(path, info)


def grid_text_conditioning(
    tensors: dict[str, torch.Tensor], store: LatentStore, cfg: RunConfig, device: torch.device
) -> Conditioning | None:
    """Text for the training sample grids: the store's distinct captions in turn (None without text)."""
    if "text_tokens" not in tensors or not (cfg.model.text_dim > 0 or cfg.model.pooled_text_dim > 0):
        return None
    first: dict[str | None, int] = {}
    for i, caption in enumerate(store.captions):
        first.setdefault(caption, i)
    rows = torch.tensor(list(first.values()))[torch.arange(cfg.train.sample_n) % len(first)]
    pooled = tensors["text_pooled"][rows].to(device) if cfg.model.pooled_text_dim > 0 else None
    return Conditioning(text_tokens=tensors["text_tokens"][rows].to(device),
                        text_mask=tensors["text_mask"][rows].to(device), text_pooled=pooled)
