"""DiT model sizes from Peebles & Xie 2023, Table 1, as data."""

from __future__ import annotations

import re

from latentpatch.errors import UserError

# name -> (depth, hidden_size, num_heads)
DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}
PATCH_SIZES = (2, 4, 8)
PRESET_FIELDS = ("depth", "hidden_size", "num_heads", "patch_size")


def preset_values(name: str) -> dict[str, int]:
    """depth, hidden_size, num_heads and patch_size of a preset such as "DiT-B/2"."""
    match = re.fullmatch(r"DiT-(S|B|L|XL)/(\d+)", name)
    if match is None or int(match.group(2)) not in PATCH_SIZES:
        names = ", ".join(f"DiT-{s}/{p}" for s in DIT_SIZES for p in PATCH_SIZES)
        raise UserError(f"model.dit.preset: unknown preset {name!r}; choose one of {names}")
    depth, hidden, heads = DIT_SIZES[match.group(1)]
    return dict(zip(PRESET_FIELDS, (depth, hidden, heads, int(match.group(2)))))
