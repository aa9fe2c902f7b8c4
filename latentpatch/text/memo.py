"""Each distinct text through the text encoder once per sampling job, not once per batch.

A batch job of thousands of images over a few prompts ran the text tower on every batch, for the same prompts
and the empty caption again and again: on the demo it was a fifth of an uncached job's CPU time. Each text goes
through the tower on its own (a batch of one), so its embedding is the same bits whatever its batch-mates, the
job's batch size or where a resumed job starts; batched with others it can differ in the last float bits (the
matrix kernels' blocking follows the batch), which is all that separates it from the per-batch embedding.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import Tensor

from latentpatch.text.open_clip_encoder import TextEmbeddings, TextEncoder

MAX_BYTES = 512 * 2**20  # rows kept: ~2,000 CLIP prompts (77 x 768 float32) or ~60 T5 ones (512 x 4096)


class MemoEncoder:
    """Wraps a TextEncoder's `encode`: texts seen before in this job come from memory, each other one goes through
    the tower alone. Least recently used rows are dropped past `max_bytes` (a job's images of one
    prompt are consecutive, so a long prompts file never needs more than a batch's worth)."""

    def __init__(self, encoder: TextEncoder, max_bytes: int = MAX_BYTES) -> None:
        self.encoder, self.max_bytes = encoder, max_bytes
        self.rows: OrderedDict[str, tuple[Tensor, Tensor, Tensor]] = OrderedDict()
        self.bytes = 0

    def encode(self, texts: Sequence[str]) -> TextEmbeddings:
        texts = [str(t) for t in texts]
        if not texts:
            return self.encoder.encode([])
        missing = list(dict.fromkeys(t for t in texts if t not in self.rows))
        for text in missing:
            new = self.encoder.encode([text])
            row = (new.tokens[0], new.mask[0], new.pooled[0])
            self.rows[text] = row
            self.bytes += sum(t.numel() * t.element_size() for t in row)
        for text in texts:
            self.rows.move_to_end(text)
        out = TextEmbeddings(*(torch.stack([self.rows[t][k] for t in texts]) for k in range(3)))
        needed = set(texts)
        while self.bytes > self.max_bytes and next(iter(self.rows)) not in needed:
            _, row = self.rows.popitem(last=False)
            self.bytes -= sum(t.numel() * t.element_size() for t in row)
        return out


def memo_encoder(encoder: TextEncoder | None) -> MemoEncoder | None:
    """A job's memo around the run's encoder (None for a run without text)."""
    return None if encoder is None else MemoEncoder(encoder)
