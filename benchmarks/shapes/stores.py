"""The two stores of the aspect-bucket measurements: the mixed-shape set split and encoded centre-cropped to
SIDE x SIDE and in aspect buckets of about that area (the shipped VAE), and the share of each image either keeps."""

from __future__ import annotations

import shutil
import statistics
from pathlib import Path

import latentpatch as lp
from latentpatch.data.buckets import kept_share
from latentpatch.data.store import LatentStore

from .data import split

SIDE = 64  # pixels: the square of the bucket area


def copy_split(src: Path, root: Path) -> dict[str, Path]:
    """images-train/ and images-heldout/ (the held-out tenth), keeping the kind subfolders."""
    train, held = split(src)
    out = {}
    for part, files in (("train", train), ("heldout", held)):
        folder = root / f"images-{part}"
        for f in files:
            dst = folder / f.relative_to(src)
            if not dst.is_file():
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(f, dst)
        out[part] = folder
    return out


def encode_stores(root: Path, images: dict[str, Path]) -> dict[str, Path]:
    """{buckets,square}-{train,heldout} stores (a rerun finds them up to date)."""
    stores = {}
    for kind, opts in (("buckets", dict(buckets=True)), ("square", {})):
        for part, folder in images.items():
            stores[f"{kind}-{part}"] = root / f"store-{kind}-{part}"
            lp.encode(folder, stores[f"{kind}-{part}"], "builtin", SIDE, device="cpu", workers=0, **opts)
    return stores


def kept_shares(store: Path) -> dict[str, float]:
    """Mean, minimum and per-kind mean kept share of a bucketed store's items, bucketed and centre-cropped."""
    m = LatentStore(store).manifest
    rows = [(i.file.split("/")[0], kept_share(*i.image_size, m.buckets[i.bucket]), kept_share(*i.image_size, (SIDE, SIDE)))
            for i in m.items]
    out = {}
    for name, pick in (("buckets", 1), ("centre-crop", 2)):
        values = [r[pick] for r in rows]
        out[name] = {"mean": statistics.mean(values), "min": min(values),
                     **{kind: statistics.mean(r[pick] for r in rows if r[0] == kind) for kind in sorted({r[0] for r in rows})}}
    return out
