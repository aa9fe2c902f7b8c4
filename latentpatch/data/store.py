"""The latent store: a writer that appends shards atomically, and a reader that loads them.

Each shard holds `mean` [n, C, h, w] and, for KL autoencoders, `std` [n, C, h, w]: the posterior's normalised
mean and standard deviation, so every read draws a fresh latent z = mean + std * eps (the VAE's own
reparameterisation, Kingma & Welling 2014, eq. 10). Extra per-item tensors (text embeddings) travel in the
same shards under their own names.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from safetensors.torch import save as serialise

from latentpatch.autoencoders import AutoencoderInfo
from latentpatch.data.buckets import kept_share
from latentpatch.data.manifest import (
    SHARD_DIR,
    Item,
    Manifest,
    ShardRecord,
    read_manifest,
    shard_name,
    write_manifest,
)
from latentpatch.data.rows import ShardedRows
from latentpatch.errors import UserError
from latentpatch.io import atomic_write_bytes

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


class StoreWriter:
    """Buffers rows and writes them as shards: shard file first, then the manifest that names it.

    Writing runs on one background thread so the GPU keeps encoding; at most one shard is in flight. Only
    that thread touches the manifest until `close()` returns. A bucketed store's rows are buffered per bucket
    (a shard holds one bucket); when all buffers together reach `shard_size`, the fullest is written, so memory
    stays bounded by about two shards however many buckets there are.
    """

    def __init__(self, root: str | Path, manifest: Manifest, shard_size: int, background: bool = True):
        self.root = Path(root)
        self.manifest = manifest
        self.shard_size = shard_size
        self._buffers: dict[tuple[int, int] | None, _Buffer] = {}
        self._names: set[str] | None = None
        self._next_index = manifest.next_shard_index()
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") if background else None
        self._pending: Future | None = None
        (self.root / SHARD_DIR).mkdir(parents=True, exist_ok=True)

    def add(self, tensors: dict[str, torch.Tensor], items: Sequence[Item],
            bucket: tuple[int, int] | None = None) -> None:
        """Queue one batch: every tensor has len(items) rows; shard/row (and, for a bucketed store, the index of
        bucket `bucket`, a pixel size) of the items are filled in on write."""
        if (bucket is None) == self.manifest.bucketed:
            raise ValueError("rows of a bucketed store need their bucket, and only those")
        if self._names is not None and set(tensors) != self._names:
            raise ValueError(f"tensor names changed within a store: {sorted(tensors)} vs {sorted(self._names)}")
        if any(t.shape[0] != len(items) for t in tensors.values()):
            raise ValueError("every tensor needs one row per item")
        self._names = set(tensors)
        buffer = self._buffers.setdefault(None if bucket is None else tuple(bucket), _Buffer())
        buffer.rows.append({k: v.detach().cpu() for k, v in tensors.items()})
        buffer.items.extend(items)
        if len(buffer.items) >= self.shard_size:
            self._flush(bucket)
        elif sum(len(b.items) for b in self._buffers.values()) >= self.shard_size:
            self._flush(max(self._buffers, key=lambda k: len(self._buffers[k].items)))

    def flush(self) -> None:
        """Write what is buffered, one shard per bucket (no-op when empty)."""
        for bucket in list(self._buffers):
            self._flush(bucket)

    def _flush(self, bucket: tuple[int, int] | None) -> None:
        buffer = self._buffers.pop(None if bucket is None else tuple(bucket), None)
        if buffer is None or not buffer.items:
            return
        tensors = {k: torch.cat([r[k] for r in buffer.rows]).contiguous() for k in buffer.rows[0]}
        name = shard_name(self._next_index)
        self._next_index += 1
        self._wait()
        if self._pool is None:
            self._write(name, tensors, buffer.items, bucket)
        else:
            self._pending = self._pool.submit(self._write, name, tensors, buffer.items, bucket)

    def close(self) -> None:
        try:
            self.flush()
            self._wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)

    def _wait(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()  # re-raises a failed write here, in the caller's thread

    def _write(self, name: str, tensors: dict[str, torch.Tensor], items: list[Item],
               bucket: tuple[int, int] | None) -> None:
        data = serialise(tensors, metadata={"format": "latentpatch-latents"})
        atomic_write_bytes(self.root / SHARD_DIR / name, data)
        index = None if bucket is None else self.manifest.use_bucket(bucket)
        shard = len(self.manifest.shards)
        self.manifest.shards.append(ShardRecord(name, len(items), hashlib.sha256(data).hexdigest(), index))
        for row, item in enumerate(items):
            item.shard, item.row, item.bucket = shard, row, index
        self.manifest.items.extend(items)
        write_manifest(self.root, self.manifest)


@dataclass
class _Buffer:
    rows: list[dict[str, torch.Tensor]] = field(default_factory=list)
    items: list[Item] = field(default_factory=list)


def remove_orphan_shards(root: str | Path, manifest: Manifest) -> int:
    """Delete shard files the manifest does not name (a run killed between shard and manifest write) and
    forget shards whose files are gone; returns how many files were removed or forgotten."""
    shard_dir = Path(root) / SHARD_DIR
    live = {s.file for s in manifest.shards}
    orphans = [p for p in shard_dir.iterdir() if p.name not in live and p.is_file()] if shard_dir.is_dir() else []
    for path in orphans:
        path.unlink()
    lost = {i for i, s in enumerate(manifest.shards) if not (shard_dir / s.file).is_file()}
    manifest.drop_shards(lost)
    return len(orphans) + len(lost)


class LatentStore:
    """Read side of a store folder; the manifest is checked on open."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest: Manifest = read_manifest(self.path)

    @property
    def info(self) -> AutoencoderInfo:
        return AutoencoderInfo.from_dict(self.manifest.autoencoder)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return tuple(self.manifest.latent_shape)  # type: ignore[return-value]

    @property
    def resolution(self) -> tuple[int, int]:
        return tuple(self.manifest.resolution)  # type: ignore[return-value]

    @property
    def stores_std(self) -> bool:
        return self.manifest.stores_std

    @property
    def items(self) -> list[Item]:
        return self.manifest.items

    @property
    def captions(self) -> list[str | None]:
        return [i.caption for i in self.manifest.items]

    def __len__(self) -> int:
        return self.manifest.count

    @property
    def bucketed(self) -> bool:
        """Whether the store holds aspect buckets (latents of several shapes): the one way to ask."""
        return self.manifest.bucketed

    @property
    def buckets(self) -> list[tuple[int, int]] | None:
        """Pixel sizes (H, W) of a bucketed store's buckets, tallest first; None for a single-shape store."""
        return [(h, w) for h, w in self.manifest.buckets] if self.manifest.bucketed else None

    @property
    def bucket_latent_shapes(self) -> list[tuple[int, int, int]]:
        """(C, h, w) of each bucket; a single-shape store has one, its latent_shape."""
        return [tuple(s) for s in self.manifest.bucket_latent_shapes]  # type: ignore[misc]

    @property
    def bucket_of(self) -> torch.Tensor:
        """Each item's bucket, in manifest order (all zeros for a single-shape store)."""
        if not self.manifest.bucketed:
            return torch.zeros(len(self), dtype=torch.long)
        return torch.tensor([i.bucket for i in self.manifest.items], dtype=torch.long)

    @property
    def bucket_counts(self) -> list[int]:
        return torch.bincount(self.bucket_of, minlength=len(self.bucket_latent_shapes)).tolist()

    @property
    def most_common_bucket(self) -> int:
        """The bucket with the most items (a tie: the one nearest square, then the first): a bucketed store's
        default shape to train at full size and to sample."""
        if self.manifest.bucketed:
            self._require_items()
        counts = self.bucket_counts
        shapes = self.bucket_latent_shapes
        return max(range(len(shapes)), key=lambda b: (counts[b], kept_share(1, 1, shapes[b][1:]), -b))

    def bucket_rows(self, names: Sequence[str] = ("mean", "std")) -> list[dict[str, ShardedRows]]:
        """Per bucket, its items' stored tensors `names` (those present) as memory-mapped rows in manifest order:
        item i is row (its rank among the items of its bucket) of bucket bucket_of[i]."""
        if not self.manifest.bucketed:
            return [self.rows(names)]
        self._require_items()
        bucket_of = self.bucket_of
        return [self._rows_of([self.manifest.items[i] for i in (bucket_of == b).nonzero().flatten().tolist()], names)
                for b in range(len(self.manifest.buckets))]

    def load(self, indices: Sequence[int] | None = None, device: torch.device | str = "cpu",
             names: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Rows `indices` (default: all, in manifest order) of the stored tensors `names` (default: all), copied
        into memory in the storage dtype."""
        items = self.manifest.items
        positions = list(range(len(items))) if indices is None else [int(i) for i in indices]
        if any(not 0 <= p < len(items) for p in positions):
            raise UserError(f"{self.path}: index out of range (the store has {len(items)} items)")
        self._require_one_shape(positions, names)
        by_shard: dict[int, tuple[list[int], list[int]]] = {}
        for out_row, p in enumerate(positions):
            outs, rows = by_shard.setdefault(items[p].shard, ([], []))
            outs.append(out_row)
            rows.append(items[p].row)
        result: dict[str, torch.Tensor] = {}
        for shard, (outs, rows) in sorted(by_shard.items()):
            tensors = self._read_shard(shard)
            if names is not None:
                tensors = {k: v for k, v in tensors.items() if k in names}
            if not result:
                result = {k: v.new_empty(len(positions), *v.shape[1:], device=device) for k, v in tensors.items()}
            if set(tensors) != set(result):
                raise UserError(f"{self._shard_path(shard)} holds {sorted(tensors)}, other shards {sorted(result)}")
            dst, src = torch.tensor(outs, device=device), torch.tensor(rows)
            for k, v in tensors.items():
                result[k][dst] = v[src].to(device)
        if not result:  # no rows: the latent shape of their one bucket, else the store's (nominal) one
            c, h, w = self.bucket_latent_shapes[items[positions[0]].bucket] if positions else self.latent_shape
            dtype = TORCH_DTYPES[self.manifest.dtype]
            result = {"mean": torch.empty(0, c, h, w, dtype=dtype, device=device)}
            if self.stores_std:
                result["std"] = torch.empty(0, c, h, w, dtype=dtype, device=device)
        return result

    def rows(self, names: Sequence[str] = ("mean", "std")) -> dict[str, ShardedRows]:
        """The stored tensors `names` (those present) as memory-mapped rows in manifest order: nothing is
        copied until rows are drawn (data.rows). A bucketed store's latents differ in shape: see bucket_rows."""
        if self.manifest.bucketed:
            raise UserError(f"latent store {self.path} holds {len(self.manifest.buckets)} aspect buckets of "
                            "different shapes; read it one bucket at a time (LatentStore.bucket_rows)")
        self._require_items()
        return self._rows_of(self.manifest.items, names)

    def _require_items(self) -> None:
        if not self.manifest.items:
            raise UserError(f"latent store {self.path} is empty; encode some images first")

    def _require_one_shape(self, positions: list[int], names: Sequence[str] | None) -> None:
        """Latents of two buckets cannot share a tensor; other tensors (text embeddings) have one shape."""
        if not self.manifest.bucketed or (names is not None and not {"mean", "std"} & set(names)):
            return
        items = self.manifest.items
        found = {items[p].bucket: p for p in positions}
        if len(found) > 1:
            shapes = self.bucket_latent_shapes
            (b1, p1), (b2, p2) = list(found.items())[:2]
            raise UserError(f"{self.path}: items {p1} and {p2} are latents of different shapes, {list(shapes[b1])} "
                            f"and {list(shapes[b2])} (aspect buckets); load one bucket at a time (bucket_of says "
                            "which) or read them with bucket_rows()")

    def _rows_of(self, items: list[Item], names: Sequence[str]) -> dict[str, ShardedRows]:
        used = sorted({i.shard for i in items})
        shards = {s: self._read_shard(s) for s in used}
        position = {s: k for k, s in enumerate(used)}
        shard_of = torch.tensor([position[i.shard] for i in items])
        row_of = torch.tensor([i.row for i in items])
        return {n: ShardedRows([shards[s][n] for s in used], shard_of, row_of) for n in names if n in shards[used[0]]}

    def latent_std(self) -> float:
        """The std of the latents training draws (posterior samples): the manifest's, recorded at encode time;
        for a store written before moments were recorded, computed from its shards."""
        from latentpatch.data.manifest import latent_std_of

        recorded = self.manifest.latent_std
        if recorded is not None:
            return recorded
        t = self.load()
        mean = t["mean"].float().flatten(1)
        second = mean.square().mean(1) + (t["std"].float().flatten(1).square().mean(1) if "std" in t else 0)
        return latent_std_of(torch.stack([mean.mean(1), second], 1))

    def require_latent_space(self, autoencoder: dict[str, Any], latent_shape: Sequence[int] | None, who: str,
                             fix: str) -> None:
        """UserError unless this store's latents are those of `autoencoder` (same_latent_space) and shape.

        `who` says whose latents they must be ("--resume: run R was trained on"), `fix` what to do instead."""
        from latentpatch.autoencoders import describe_autoencoder, same_latent_space

        have = self.info.to_dict()
        if latent_shape is not None and [int(v) for v in latent_shape] != list(self.latent_shape):
            raise UserError(f"{who} latents of shape {list(latent_shape)}, but store {self.path} holds "
                            f"{list(self.latent_shape)}; {fix}")
        if not same_latent_space(autoencoder, have):
            raise UserError(f"{who} latents of the {describe_autoencoder(autoencoder)}, but store {self.path} "
                            f"was encoded with the {describe_autoencoder(have)}; {fix}")

    def _shard_path(self, shard: int) -> Path:
        return self.path / SHARD_DIR / self.manifest.shards[shard].file

    def _read_shard(self, shard: int) -> dict[str, torch.Tensor]:
        path, record = self._shard_path(shard), self.manifest.shards[shard]
        try:
            tensors = load_file(path)
        except (OSError, SafetensorError) as e:
            raise UserError(f"could not read shard {path}: {e}") from e
        expected = (record.count, *self.manifest.bucket_latent_shapes[record.bucket or 0])
        dtype = TORCH_DTYPES[self.manifest.dtype]
        for name in ("mean", "std") if self.manifest.stores_std else ("mean",):
            t = tensors.get(name)
            if t is None or tuple(t.shape) != expected or t.dtype != dtype:
                got = None if t is None else (tuple(t.shape), str(t.dtype))
                raise UserError(f"shard {path}: '{name}' is {got}, manifest says {expected} {self.manifest.dtype}")
        return tensors
