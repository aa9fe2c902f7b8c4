"""Conditioning from a latent store's rows: training batches (with dropout), held-out sets and preview grids.

`condition_rows` puts a row-aligned tensor per field beside the latents once (labels, text embeddings from
the store's cache or embedded once here) plus the empty caption's `null_*`; every later draw is an index.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

from latentpatch.conditioning.spec import ConditioningSpec, TextSource
from latentpatch.conditioning.tensors import Conditioning
from latentpatch.errors import UserError

if TYPE_CHECKING:
    from latentpatch.data.store import LatentStore

TEXT_FIELDS = ("text_tokens", "text_mask", "text_pooled")


def condition_rows(
    spec: ConditioningSpec, store: LatentStore, tensors: dict[str, Tensor], text: TextSource | None,
    *, missing_label: str = "error",
) -> dict[str, Tensor]:
    """Per-row `labels` [N] and text_* tensors for the store's rows in `tensors` (all of the store's items),
    plus null_text_* [1, ...]; cut to the longest caption. `missing_label` "error" refuses items without a
    label, "null" scores them with the null label (held-out sets)."""
    rows: dict[str, Tensor] = {}
    if spec.num_classes > 0:
        rows["labels"] = _labels(store, spec.num_classes, missing_label)
    if spec.text:
        if text is None:
            raise UserError("a text-conditioned spec needs its text source")
        rows.update(_text_rows(text, store, tensors))
    return rows


def _labels(store: LatentStore, num_classes: int, missing: str) -> Tensor:
    labels = [item.label for item in store.items]
    if missing == "error" and any(label is None for label in labels):
        raise UserError(f"model.num_classes={num_classes} but the items of {store.path} have no 'label'; "
                        "encode with labels or set model.num_classes=0")
    out = torch.tensor([num_classes if label is None else int(label) for label in labels], dtype=torch.long)
    bad = out[(out < 0) | (out > num_classes) | ((out == num_classes) & (missing == "error"))]
    if bad.numel():
        raise UserError(f"{store.path} has label {int(bad[0])}, outside 0..{num_classes - 1} "
                        f"(model.num_classes={num_classes}); raise model.num_classes")
    return out


def _text_rows(text: TextSource, store: LatentStore, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    from latentpatch.data.store import TORCH_DTYPES
    from latentpatch.text.cache import cached_rows, read_null
    from latentpatch.text.open_clip_encoder import TextEmbeddings

    captions = store.captions
    dtype = TORCH_DTYPES[store.manifest.dtype]
    if text.cached:
        emb, stale = cached_rows(tensors, captions)
        null = read_null(store.path)
        if stale:  # captions edited after encoding: embed just those rows again
            fresh = text.get_encoder().encode([captions[i] for i in stale])
            emb.tokens[stale], emb.mask[stale] = fresh.tokens.to(emb.tokens.dtype), fresh.mask
            emb.pooled[stale] = fresh.pooled.to(emb.pooled.dtype)
    else:
        unique = sorted(set(captions))
        every = text.get_encoder().encode(unique + [""])
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


def select_rows(spec: ConditioningSpec, rows: dict[str, Tensor], indices: Tensor) -> Conditioning | None:
    """The conditioning of rows `indices`, nothing dropped (held-out sets, previews, one rank's batch rows)."""
    if not spec.conditional:
        return None
    cond = Conditioning()
    if spec.num_classes > 0:
        cond.class_labels = rows["labels"][indices.to(rows["labels"].device)]
    if spec.text:
        for key in _text_fields(spec):
            setattr(cond, key, rows[key][indices.to(rows[key].device)])
    return cond


def draw_rows(
    spec: ConditioningSpec, rows: dict[str, Tensor], indices: Tensor, generator: torch.Generator,
    label_dropout: float, caption_dropout: float, own: slice = slice(None),
) -> Conditioning | None:
    """The conditioning of a training batch `indices`: label dropout (the null label is num_classes), then
    caption dropout (the empty caption's embedding), drawn from `generator` for the whole batch in that order
    (Ho & Salimans 2022); only the rows of `own` (this rank's slice) are read and returned."""
    cond = select_rows(spec, rows, indices[own])
    if cond is None:
        return None
    device = generator.device
    if cond.class_labels is not None:
        labels = cond.class_labels.to(device)
        drop = (torch.rand(indices.shape, generator=generator, device=device) < label_dropout)[own]
        cond.class_labels = torch.where(drop, torch.full_like(labels, spec.num_classes), labels)
    if spec.text:
        drop = (torch.rand(indices.shape, generator=generator, device=device) < caption_dropout)[own]
        for key in _text_fields(spec):
            value = getattr(cond, key).to(device)
            null = rows["null_" + key].to(device)
            setattr(cond, key, torch.where(drop.view(-1, *[1] * (value.dim() - 1)), null, value))
    return cond


def preview_conditioning(
    spec: ConditioningSpec, rows: dict[str, Tensor], captions: list[str | None], n: int,
) -> Conditioning | None:
    """The conditioning of an n-image preview grid: the store's distinct captions in turn, or the class labels
    0, 1, 2, ... (the same at every step, so a run's grids show one set of samples evolve)."""
    if spec.text:
        first: dict[str | None, int] = {}
        for i, caption in enumerate(captions):
            first.setdefault(caption, i)
        return select_rows(spec, rows, torch.tensor(list(first.values()))[torch.arange(n) % len(first)])
    if spec.num_classes > 0:
        return Conditioning(class_labels=torch.arange(n) % spec.num_classes)
    return None


def _text_fields(spec: ConditioningSpec) -> tuple[str, ...]:
    return ("text_tokens", "text_mask") + (("text_pooled",) if spec.pooled else ())
