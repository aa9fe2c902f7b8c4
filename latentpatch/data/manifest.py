"""The latent store's manifest: the contract between encode and train.

A store folder holds `manifest.json` and `shards/shard-NNNNN.safetensors`. The manifest says which
autoencoder made the latents (enough to load it again), at what resolution, in which dtype, and, per item,
its source file, the file's sha256, caption, flip and where its row lives. A bucketed store (encode --buckets)
also lists its buckets (pixel sizes) and puts each item, and each shard, in one of them; a single-shape store's
manifest has none of those keys. It is rewritten atomically after each shard, so a shard file it does not name
is an orphan left by a killed run. What a rerun of encode has to do is read from it (encoding.plan).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from latentpatch.autoencoders.info import LATENT_SPACE_KEYS, describe_autoencoder, same_latent_space
from latentpatch.data.buckets import aspect
from latentpatch.errors import UserError
from latentpatch.io import write_json_atomic

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_DIR = "shards"
STORE_MODES = ("mean-std", "sample")
STORAGE_DTYPES = ("float16", "bfloat16", "float32")
_SHARD_NAME = re.compile(r"shard-\d{5,}\.safetensors")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


@dataclass
class ShardRecord:
    file: str  # name inside shards/
    count: int  # rows in the file (items may reference fewer: stale rows are dropped, not rewritten)
    sha256: str
    bucket: int | None = None  # index into Manifest.buckets: a bucketed store's shard holds one bucket's rows

    def to_dict(self) -> dict[str, Any]:
        return _without_unset(asdict(self), ("bucket",))


@dataclass
class Item:
    file: str  # source path relative to the image folder, POSIX
    sha256: str  # of the source file's bytes
    caption: str | None
    flip: bool  # True: the horizontally flipped view of the image
    shard: int  # index into Manifest.shards
    row: int
    size: int | None = None  # source size and mtime: a rerun skips hashing files whose stat is unchanged
    mtime_ns: int | None = None
    label: int | None = None  # class index into the manifest's class_names (encode --labels folders)
    moments: list[float] | None = None  # [E z, E z^2] over the item's latent elements, z a posterior draw
    bucket: int | None = None  # index into Manifest.buckets (a bucketed store), else None
    image_size: list[int] | None = None  # [H, W] of the source image (a bucketed store): its kept share follows

    def to_dict(self) -> dict[str, Any]:
        return _without_unset(asdict(self), ("bucket", "image_size"))


def _without_unset(d: dict[str, Any], optional: tuple[str, ...]) -> dict[str, Any]:
    """Keys of bucketed stores are written only when set, so a single-shape manifest reads as it always did."""
    return {k: v for k, v in d.items() if k not in optional or v is not None}


@dataclass
class Manifest:
    autoencoder: dict[str, Any]  # AutoencoderInfo.to_dict()
    resolution: list[int]  # [H, W] in pixels; a bucketed store: [R, R], the buckets' target area R^2
    latent_shape: list[int]  # [C, h, w]; a bucketed store: [C, R/f, R/f], nominal (the square of that area)
    dtype: str  # storage dtype of every tensor in the shards
    stores_std: bool  # True: `mean` and `std` of the posterior, draw a fresh latent per read
    store: str = "mean-std"  # what was asked: "mean-std" or "sample"
    flip: bool = False  # every image also stored flipped
    buckets: list[list[int]] | None = None  # [H, W] pixel sizes of the buckets in use, tallest first; None: one shape
    bucket_step: int | None = None  # what a bucketed store's buckets were built with (data.buckets.bucket_sizes)
    max_aspect: float | None = None
    text_encoder: dict[str, Any] | None = None
    shards: list[ShardRecord] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # {file, size, mtime_ns, reason, detail}
    format_version: int = FORMAT_VERSION
    extra: dict[str, Any] = field(default_factory=dict)  # keys written by newer code, kept on rewrite

    @property
    def count(self) -> int:
        return len(self.items)

    @property
    def bucketed(self) -> bool:
        """Whether the store holds aspect buckets (latents of several shapes)."""
        return self.buckets is not None

    @property
    def latent_std(self) -> float | None:
        """The std of the stored latents (posterior draws z = mean + std * eps), from the items' moments; None
        when an item lacks them (stores written before they were recorded)."""
        if not self.items or any(i.moments is None for i in self.items):
            return None
        if self.buckets is None:
            return latent_std_of([i.moments for i in self.items])
        elements = [h * w for _, h, w in self.bucket_latent_shapes]  # buckets' items differ a little in size
        return latent_std_of([i.moments for i in self.items], [elements[i.bucket] for i in self.items])

    @property
    def bucket_latent_shapes(self) -> list[list[int]]:
        """[C, h, w] of each bucket (one entry, latent_shape, for a single-shape store)."""
        if self.buckets is None:
            return [list(self.latent_shape)]
        f = int(self.autoencoder["factor"])
        return [[self.latent_shape[0], h // f, w // f] for h, w in self.buckets]

    def use_bucket(self, size: Sequence[int]) -> int:
        """Index of bucket `size` (pixels), added in its place (tallest first) if new: the indices of the items and
        shards of the buckets after it move up by one."""
        size = [int(size[0]), int(size[1])]
        assert self.buckets is not None, "use_bucket on a single-shape store"
        if size in self.buckets:
            return self.buckets.index(size)
        at = sum(aspect(b) > aspect(size) for b in self.buckets)
        self.buckets.insert(at, size)
        for record in (*self.items, *self.shards):
            if record.bucket is not None and record.bucket >= at:
                record.bucket += 1
        return at

    def drop_unused_buckets(self) -> list[ShardRecord]:
        """Forget buckets no item is in (their images changed shape), and their shards, which hold only stale rows;
        returns the shards forgotten, whose files the caller deletes once the manifest is written."""
        if self.buckets is None:
            return []
        used = sorted({i.bucket for i in self.items})
        if len(used) == len(self.buckets):
            return []
        lost = {k for k, s in enumerate(self.shards) if s.bucket not in used}
        dropped = [self.shards[k] for k in sorted(lost)]
        self.drop_shards(lost)
        renumber = {old: new for new, old in enumerate(used)}
        self.buckets = [self.buckets[b] for b in used]
        for record in (*self.items, *self.shards):
            record.bucket = renumber[record.bucket]
        return dropped

    @property
    def identity(self) -> str:
        """The store's content as one sha256: which images (source sha256, flip, label), through which
        autoencoder and at what resolution, and for a bucketed store in which bucket (pixel size); independent of
        shard layout, item order, paths and captions. Runs record it (run.json `store`), and a resume onto a store
        with another identity is refused."""
        ae = self.autoencoder
        space = {k: ae.get(k) for k in LATENT_SPACE_KEYS}  # as same_latent_space: weights by revision, else source
        space["weights"] = ae.get("revision") or ae.get("source")
        views = sorted(f"{i.sha256}:{int(i.flip)}:{i.label}{self._bucket_tag(i)}" for i in self.items)
        record = json.dumps({"autoencoder": space, "resolution": list(self.resolution), "items": views})
        return hashlib.sha256(record.encode()).hexdigest()

    def _bucket_tag(self, item: Item) -> str:
        if self.buckets is None:
            return ""
        h, w = self.buckets[item.bucket]
        return f":{h}x{w}"

    @property
    def image_count(self) -> int:
        """Distinct source images (a flipped view is an item, not an image)."""
        return len({i.sha256 for i in self.items})

    @property
    def class_names(self) -> list[str] | None:
        """The classes of `encode --labels folders` (item.label indexes them), or None."""
        return self.extra.get("class_names")

    def to_dict(self) -> dict[str, Any]:
        d = {
            "format_version": self.format_version,
            "autoencoder": self.autoencoder,
            "resolution": list(self.resolution),
            "latent_shape": list(self.latent_shape),
            "dtype": self.dtype,
            "stores_std": self.stores_std,
            "store": self.store,
            "flip": self.flip,
            **({} if self.buckets is None else {"buckets": self.buckets, "bucket_step": self.bucket_step,
                                                "max_aspect": self.max_aspect}),
            "count": self.count,
            "text_encoder": self.text_encoder,
            "latent_std": self.latent_std,
            "identity": self.identity,
            **self.extra,
            "shards": [s.to_dict() for s in self.shards],
            "skipped": self.skipped,
            "items": [i.to_dict() for i in self.items],
        }
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "manifest") -> Manifest:
        """Parse and check a manifest; any inconsistency is a UserError naming `where`."""
        try:
            if not isinstance(d, dict):
                raise ValueError("not a JSON object")
            if d.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format_version {d.get('format_version')!r}, this code reads {FORMAT_VERSION}")
            known = {f for f in cls.__dataclass_fields__ if f != "extra"} | {"count", "latent_std", "identity"}
            m = cls(
                autoencoder=dict(d["autoencoder"]),
                resolution=[int(x) for x in d["resolution"]],
                latent_shape=[int(x) for x in d["latent_shape"]],
                dtype=str(d["dtype"]),
                stores_std=bool(d["stores_std"]),
                store=str(d.get("store", "mean-std")),
                flip=bool(d.get("flip", False)),
                buckets=None if d.get("buckets") is None else [[int(x) for x in b] for b in d["buckets"]],
                bucket_step=None if d.get("bucket_step") is None else int(d["bucket_step"]),
                max_aspect=None if d.get("max_aspect") is None else float(d["max_aspect"]),
                text_encoder=d.get("text_encoder"),
                shards=[ShardRecord(**s) for s in d["shards"]],
                items=[Item(**i) for i in d["items"]],
                skipped=list(d.get("skipped", [])),
                extra={k: v for k, v in d.items() if k not in known},
            )
            m.check()
        except (KeyError, TypeError, ValueError) as e:
            detail = f"missing field {e}" if isinstance(e, KeyError) else str(e)
            raise UserError(f"{where} is not a valid latent store manifest: {detail}") from e
        if "count" in d and d["count"] != m.count:
            raise UserError(f"{where}: count {d['count']} does not match its {m.count} items")
        return m

    def check(self) -> None:
        if self.dtype not in STORAGE_DTYPES:
            raise ValueError(f"dtype {self.dtype!r} is not one of {STORAGE_DTYPES}")
        if len(self.resolution) != 2 or len(self.latent_shape) != 3:
            raise ValueError("resolution must be [H, W] and latent_shape [C, h, w]")
        for s in self.shards:
            if not _SHARD_NAME.fullmatch(s.file):  # also keeps every read inside the store folder
                raise ValueError(f"shard file name {s.file!r} is not shard-NNNNN.safetensors")
        for s in self.skipped:
            if not isinstance(s, dict) or not {"file", "size", "mtime_ns", "reason", "detail"} <= set(s):
                raise ValueError(f"skipped entry {s!r} needs file, size, mtime_ns, reason and detail")
        for i in self.items:
            if not 0 <= i.shard < len(self.shards) or not 0 <= i.row < self.shards[i.shard].count:
                raise ValueError(f"item {i.file!r} points at shard {i.shard} row {i.row}, which does not exist")
        self._check_buckets()

    def _check_buckets(self) -> None:
        """Every shard of a bucketed store holds one bucket, and each of its items is in that bucket."""
        if self.buckets is None:
            stray = next((r for r in (*self.shards, *self.items) if r.bucket is not None), None)
            if stray is not None:
                raise ValueError(f"{stray.file!r} names bucket {stray.bucket} but the manifest has no buckets")
            return
        f = int(self.autoencoder["factor"])
        for b in self.buckets:
            if len(b) != 2 or min(b) < 1 or b[0] % f or b[1] % f:
                raise ValueError(f"bucket {b} is not an [H, W] of positive multiples of the factor {f}")
        if len({tuple(b) for b in self.buckets}) != len(self.buckets):
            raise ValueError(f"buckets {self.buckets} name a size twice")
        for s in self.shards:
            if not isinstance(s.bucket, int) or not 0 <= s.bucket < len(self.buckets):
                raise ValueError(f"shard {s.file!r} names bucket {s.bucket}; the manifest has {len(self.buckets)}")
        for i in self.items:
            if i.bucket != self.shards[i.shard].bucket:
                raise ValueError(f"item {i.file!r} is in bucket {i.bucket} but its shard "
                                 f"{self.shards[i.shard].file} holds bucket {self.shards[i.shard].bucket}")

    def differences(self, want: Manifest) -> list[str]:
        """What a run asking for `want` would change in this store, one line per setting."""
        out = []
        if not same_latent_space(self.autoencoder, want.autoencoder):
            have, asked = describe_autoencoder(self.autoencoder), describe_autoencoder(want.autoencoder)
            out.append(f"autoencoder: the store has {have}, this run asks for {asked}")
        for name in ("resolution", "dtype", "store", "flip", "bucket_step", "max_aspect"):  # latent_shape follows
            have, asked = getattr(self, name), getattr(want, name)
            if have != asked:
                out.append(f"{name}: the store has {have}, this run asks for {asked}")
        return out

    def drop_shards(self, lost: set[int]) -> None:
        """Forget shards whose files are gone, and their items (a rerun encodes those images again)."""
        keep = [i for i in range(len(self.shards)) if i not in lost]
        renumber = {old: new for new, old in enumerate(keep)}
        self.shards = [self.shards[i] for i in keep]
        self.items = [i for i in self.items if i.shard not in lost]
        for item in self.items:
            item.shard = renumber[item.shard]

    def next_shard_index(self) -> int:
        """Shard files are numbered after the highest one named, so a new shard never reuses a live name."""
        return 1 + max((int(s.file[6:-12]) for s in self.shards), default=-1)


def latent_std_of(moments: list[list[float]] | Any, elements: list[int] | None = None) -> float:
    """sqrt(E[z^2] - E[z]^2) over items, from their [E z, E z^2]; items of unequal size weighted by `elements`."""
    m = torch.as_tensor(moments, dtype=torch.float64).reshape(-1, 2)
    if elements is None:
        m = m.mean(0)
    else:
        weights = torch.as_tensor(elements, dtype=torch.float64)
        m = (m * weights[:, None]).sum(0) / weights.sum()
    return float((m[1] - m[0] ** 2).clamp_min(0).sqrt())


def manifest_path(store: str | Path) -> Path:
    return Path(store) / MANIFEST_NAME


def read_manifest(store: str | Path) -> Manifest:
    """Read `STORE/manifest.json`; a missing, unreadable or inconsistent one is a UserError."""
    path = manifest_path(store)
    if not Path(store).is_dir():
        raise UserError(f"latent store {store} does not exist (no such folder)")
    if not path.is_file():
        raise UserError(f"{store} is not a latent store: it has no {MANIFEST_NAME}")
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"could not read {path}: {e}") from e
    return Manifest.from_dict(d, where=str(path))


def write_manifest(store: str | Path, manifest: Manifest) -> None:
    write_json_atomic(manifest_path(store), manifest.to_dict())
