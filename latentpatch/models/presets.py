"""DiT model sizes from Peebles & Xie 2023, Table 1, as data."""

from __future__ import annotations

import dataclasses
import re

from latentpatch.errors import UserError
from latentpatch.models.model_config import ModelConfig

# name -> (depth, hidden_size, num_heads)
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
PATCH_SIZES = (2, 4, 8)


def apply_preset(cfg: ModelConfig) -> ModelConfig:
    """Return cfg with depth/hidden_size/num_heads/patch_size taken from cfg.preset (unchanged if None)."""
    if cfg.preset is None:
        return cfg
    match = re.fullmatch(r"DiT-(S|B|L|XL)/(\d+)", cfg.preset)
    if match is None or int(match.group(2)) not in PATCH_SIZES:
        names = ", ".join(f"DiT-{s}/{p}" for s in DIT_SIZES for p in PATCH_SIZES)
        raise UserError(f"model.preset: unknown preset {cfg.preset!r}; choose one of {names}")
    depth, hidden, heads = DIT_SIZES[match.group(1)]
    return dataclasses.replace(
        cfg, depth=depth, hidden_size=hidden, num_heads=heads, patch_size=int(match.group(2))
    )
