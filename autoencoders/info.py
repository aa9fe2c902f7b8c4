"""What an autoencoder is, recorded in every latent store so the same one decodes at sampling time."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

from latentpatch.errors import UserError

KINDS = ("kl", "tiny", "pixel")


@dataclass
class AutoencoderInfo:
    """Enough to load the autoencoder again and to undo its latent normalisation."""

    kind: str  # "kl" | "tiny" | "pixel"
    source: str  # hub id, absolute local folder, "pixel", or "builtin:NAME"
    revision: str | None  # hub commit (or requested revision) / sha256 of a folder's weights
    latent_channels: int
    factor: int  # spatial downsampling factor (1 for pixel)
    scaling_factor: float
    shift_factor: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AutoencoderInfo:
        """Strict: a manifest with missing or unknown keys is corrupt, and silently guessing would mis-decode."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        missing = sorted(names - set(d))
        if unknown or missing:
            raise UserError(
                f"autoencoder info is not valid: unknown keys {unknown}, missing keys {missing} "
                f"(expected exactly {sorted(names)})"
            )
        if d["kind"] not in KINDS:
            raise UserError(f"autoencoder info has kind {d['kind']!r}; expected one of {KINDS}")
        return cls(
            kind=str(d["kind"]),
            source=str(d["source"]),
            revision=None if d["revision"] is None else str(d["revision"]),
            latent_channels=int(d["latent_channels"]),
            factor=int(d["factor"]),
            scaling_factor=float(d["scaling_factor"]),
            shift_factor=float(d["shift_factor"]),
        )


# The fields that fix what a latent means; `source` and `revision` say which weights made it.
LATENT_SPACE_KEYS = ("kind", "latent_channels", "factor", "scaling_factor", "shift_factor")


def same_latent_space(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether latents made by autoencoder records `a` and `b` mean the same thing: the same kind, shape and
    normalisation, and the same weights — by sha256 (`revision`) when both record one, wherever the folder
    now lives; else by source. The one answer to "are these the same latents?" for every stage."""
    if any(a.get(k) != b.get(k) for k in LATENT_SPACE_KEYS):
        return False
    if a.get("revision") and b.get("revision"):
        return a["revision"] == b["revision"]
    return a.get("source") == b.get("source") and a.get("revision") == b.get("revision")


def describe_autoencoder(d: dict[str, Any]) -> str:
    rev = f" (revision {str(d['revision'])[:12]})" if d.get("revision") else ""
    return f"{d.get('kind')} autoencoder {d.get('source')}{rev}"
