"""One way to derive every seed: a 63-bit integer from the parts that name a random draw.

Every random choice in latentpatch (a training step's images, crops, noise levels and noise; an image's
sampling noise; a held-out image's fixed noise; a stored posterior sample) comes from a generator seeded
with `derive_seed(seed, ...)` of the parts that identify it, so it is the same in every process, on every
rank and after any resume, and independent of batch sizes.
"""

from __future__ import annotations

import hashlib

import torch


def derive_seed(*parts: int | str | bool) -> int:
    """63 bits of sha256 of the parts joined by "/" (so (0, 12) and (1, 2) never collide)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def make_generator(device: torch.device | str, *parts: int | str | bool) -> torch.Generator:
    """A generator on `device` seeded with derive_seed(*parts)."""
    return torch.Generator(device=device).manual_seed(derive_seed(*parts))


def image_seed(seed: int, index: int, stream: str = "") -> int:
    """The seed of image `index` of a generation job with seed `seed`; `stream` names another independent draw."""
    return derive_seed(*((stream,) if stream else ()), int(seed), int(index))
