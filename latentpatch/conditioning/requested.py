"""Conditioning asked for at sampling time: prompts through the run's text encoder, class labels, and the
null condition (the empty caption / the null label) that classifier-free guidance contrasts them with."""

from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from latentpatch.conditioning.spec import ConditioningSpec
from latentpatch.conditioning.tensors import Conditioning
from latentpatch.errors import UserError

if TYPE_CHECKING:
    from latentpatch.text.open_clip_encoder import TextEncoder


def check_request(spec: ConditioningSpec, prompts: Sequence[str] | None, class_labels: Sequence[int] | None) -> None:
    """UserError for a request the run cannot serve: prompts for a model without text, none for one with."""
    if prompts is not None and class_labels is not None:
        raise UserError("give prompts or class labels, not both")
    if prompts is not None and not spec.text:
        raise UserError("this model is not text-conditioned; drop --prompt/--prompts (use --class for a class model)")
    if prompts is None and spec.text:
        raise UserError('this model is text-conditioned; give --prompt/--prompts (--prompt "" samples it '
                        "unconditionally)")
    if class_labels is not None:
        check_class_labels(spec, class_labels)


def check_class_labels(spec: ConditioningSpec, class_labels: Sequence[int]) -> None:
    k = spec.num_classes
    if k == 0:
        raise UserError("this model has no classes (it was trained without class labels); drop --class")
    for c in class_labels:
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < k:
            raise UserError(f"class {c!r} is out of range: this model has classes 0..{k - 1}")


def request_conditioning(
    spec: ConditioningSpec, encoder: TextEncoder | None, prompts: Sequence[str] | None = None,
    class_labels: Sequence[int] | None = None, device: torch.device | str = "cpu",
) -> tuple[Conditioning | None, Conditioning | None]:
    """(cond, uncond) for a batch: one prompt or class per image; uncond is the null label / the empty caption
    (what label and caption dropout trained). `encoder` is the run's text encoder (None without text)."""
    check_request(spec, prompts, class_labels)
    if prompts is not None:
        if encoder is None:
            raise UserError("this text-conditioned run needs its text encoder to embed prompts")
        return _prompt_conditioning(spec, encoder, prompts, device)
    if class_labels is None:
        return None, None
    labels = torch.tensor([int(c) for c in class_labels], dtype=torch.long, device=device)
    return Conditioning(class_labels=labels), Conditioning(class_labels=torch.full_like(labels, spec.num_classes))


def _prompt_conditioning(
    spec: ConditioningSpec, encoder: TextEncoder, prompts: Sequence[str], device: torch.device | str
) -> tuple[Conditioning, Conditioning]:
    """Prompts and as many empty captions through the encoder, cut to one common length."""
    from latentpatch.text.open_clip_encoder import trim_to_longest

    prompts = [str(p) for p in prompts]
    emb = encoder.encode(prompts + [""])
    tokens, mask = trim_to_longest(emb.tokens, emb.mask)
    n = len(prompts)
    both = Conditioning(text_tokens=tokens, text_mask=mask, text_pooled=emb.pooled if spec.pooled else None)
    return both.select(torch.arange(n)).to(device), both.select(torch.full((n,), n)).to(device)
