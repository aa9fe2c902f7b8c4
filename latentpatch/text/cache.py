"""Text embeddings kept in the latent store, so training never runs the text encoder.

Each shard row carries `text_tokens` [L, D], `text_mask` [L], `text_pooled` [P] and `text_caption_hash` (a
fingerprint of the caption it was computed from: a caption edited after encoding is noticed, not trusted).
The empty caption's embedding, which caption dropout and guidance use, is `text_null.safetensors` beside the
manifest; `manifest.text_encoder` records the encoder (name, weights, hashes, widths, max_length).
"""

from __future__ import annotations

import os
from collections import OrderedDict
from pathlib import Path
from typing import Callable

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from latentpatch.data.manifest import Item, Manifest
from latentpatch.errors import UserError
from latentpatch.io import atomic_save_safetensors
from latentpatch.text.identity import caption_hash, describe, parse_text_encoder, same_text_encoder
from latentpatch.text.loader import load_text_encoder, load_text_encoder_from_record
from latentpatch.text.open_clip_encoder import TextEmbeddings, TextEncoder

NULL_FILE = "text_null.safetensors"
TEXT_KEYS = ("text_tokens", "text_mask", "text_pooled")
HASH_KEY = "text_caption_hash"
KEEP_CAPTIONS = 1024  # rows of this many recent captions kept while encoding (~120 MB at 77 x 768 in float16)


def open_store_text(
    out: Path, manifest: Manifest, spec: str | TextEncoder | None, device: torch.device | str | None,
    max_length: int | None = None,
) -> TextEncoder | None:
    """The encoder for an encode run into `out` (`spec` is "MODEL[:PRETRAINED]"), recorded in the manifest.

    A rerun without `spec` keeps the store's own encoder; a store made without text embeddings, or with
    another encoder, cannot mix in new rows and is refused.
    """
    recorded = manifest.text_encoder
    if spec is None and recorded is None:
        return None
    if spec is None:
        encoder = load_text_encoder_from_record(recorded, device=device)
    elif isinstance(spec, TextEncoder):
        encoder = spec
    else:
        model, pretrained = parse_text_encoder(str(spec))
        encoder = load_text_encoder(model, pretrained, max_length=max_length, device=device)
    if manifest.count > 0 and recorded is None:
        raise UserError(f"{out} was encoded without text embeddings; every row needs them, so encode with "
                        "--text-encoder into a new --out")
    if recorded is not None and not same_text_encoder(recorded, encoder.record):
        raise UserError(f"{out} holds text embeddings from {describe(recorded)}; this run asks for "
                        f"{describe(encoder.record)}. Encode into a new --out, or drop --text-encoder")
    manifest.text_encoder = encoder.record
    null = encoder.encode([""])
    atomic_save_safetensors({k: v for k, v in zip(TEXT_KEYS, (null.tokens, null.mask, null.pooled))}, out / NULL_FILE)
    return encoder


def with_text_rows(
    previous: Callable[[list[Item]], dict[str, torch.Tensor]] | None, encoder: TextEncoder, dtype: torch.dtype,
    keep: int = KEEP_CAPTIONS,
) -> Callable[[list[Item]], dict[str, torch.Tensor]]:
    """An encode `extra_tensors` callable that adds each item's caption embedding to its shard row.

    The text tower runs once per distinct caption, not once per image: each new caption of a batch is embedded
    once, and the rows of the last `keep` captions are kept across encode batches (a captioned folder often
    repeats a few captions on every image). A row equals the per-image path's up to the tower's float rounding,
    which follows its batch shape (tests/test_text_rows.py)."""
    known: OrderedDict[str | None, dict[str, torch.Tensor]] = OrderedDict()

    def rows(items: list[Item]) -> dict[str, torch.Tensor]:
        out = previous(items) if previous is not None else {}
        captions = [i.caption for i in items]
        new = [c for c in dict.fromkeys(captions) if c not in known]
        if new:
            made = encoder.item_tensors(new, dtype)
            for j, caption in enumerate(new):
                known[caption] = {k: v[j] for k, v in made.items()}
        for caption in captions:
            known.move_to_end(caption)
        out.update({k: torch.stack([known[c][k] for c in captions]) for k in (*TEXT_KEYS, HASH_KEY)})
        while len(known) > max(keep, len(set(captions))):
            known.popitem(last=False)
        return out

    return rows


def read_null(store_path: str | os.PathLike) -> TextEmbeddings:
    """The store's cached embedding of the empty caption."""
    path = Path(store_path) / NULL_FILE
    try:
        t = load_file(path)
        return TextEmbeddings(t["text_tokens"], t["text_mask"].bool(), t["text_pooled"])
    except (OSError, KeyError, SafetensorError) as e:
        raise UserError(f"{path} (the empty caption's cached embedding) is missing or unreadable: {e}; "
                        "rerun `latentpatch encode` on the store") from e


def cached_rows(tensors: dict[str, torch.Tensor], captions: list[str | None]) -> tuple[TextEmbeddings, list[int]]:
    """The store's per-row embeddings and the rows whose caption changed since they were computed."""
    emb = TextEmbeddings(tensors["text_tokens"], tensors["text_mask"].bool(), tensors["text_pooled"])
    stored = tensors[HASH_KEY].tolist() if HASH_KEY in tensors else [None] * len(captions)
    stale = [i for i, (h, c) in enumerate(zip(stored, captions)) if h != caption_hash(c)]
    return emb, stale
