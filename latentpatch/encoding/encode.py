"""The encode stage: image folder -> autoencoder -> latent store, resumable at any point.

Files are decoded and hashed in DataLoader workers; resizing, the autoencoder and the flip run on the device
in batches; shards are written on a background thread, each followed by an atomic manifest rewrite. A rerun
compares the folder with the manifest (relative path + sha256) and encodes only what is new or changed.
With `buckets`, each image goes to the aspect bucket nearest its shape (data.buckets) instead of one size.
"""

from __future__ import annotations

import inspect
import math
import os
import time
from collections import Counter
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from latentpatch.autoencoders import Autoencoder, load_autoencoder
from latentpatch.data.buckets import bucket_sizes, check_bucket_options, default_bucket_step, kept_share, nearest_bucket
from latentpatch.data.images import (
    IMAGE_EXTENSIONS,
    SMALLER,
    DecodedImage,
    decode_file,
    is_image_name,
    read_captions,
    scan_sources,
)
from latentpatch.data.manifest import MANIFEST_NAME, Item, Manifest, read_manifest, write_manifest
from latentpatch.data.store import TORCH_DTYPES, StoreWriter, remove_orphan_shards
from latentpatch.text.cache import open_store_text, with_text_rows
from latentpatch.data.transforms import as_size, check_resolution, covers, resize_center_crop
from latentpatch.device import resolve_device
from latentpatch.encoding.options import REPORT_NAME, EncodeOptions, EncodeSummary, api_parameters
from latentpatch.encoding.plan import plan_update
from latentpatch.errors import UserError
from latentpatch.io import lock_folder, write_json_atomic
from latentpatch.seeding import derive_seed

LOCK_NAME = ".encode.lock"
SHARD_BYTES = 256 << 20  # a shard's size bound: the writer buffers about two shards in memory


class _SourceFiles(Dataset):
    """Decoding runs here, in DataLoader workers: stat, read, hash, decode; never raises for a bad file."""

    def __init__(self, src: Path, files: list[str]):
        self.src, self.files = src, files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[str, tuple[int, int] | None, DecodedImage]:
        path = self.src / self.files[i]
        try:
            st = path.stat()  # before reading: a later edit then shows as a newer mtime on the next run
            stat = (st.st_size, st.st_mtime_ns)
        except OSError:
            stat = None
        return self.files[i], stat, decode_file(path)


class _Pending:
    """A batch's latents on their way to the host: the copy is queued behind the autoencoder's kernels and
    waited for only after the next batch is queued, so the GPU is not idle while the CPU prepares it."""

    def __init__(self, tensors: dict[str, torch.Tensor], items: list[Item], bucket: tuple[int, int] | None):
        self.items, self.bucket = items, bucket
        cuda = any(t.is_cuda for t in tensors.values())
        self.tensors = {k: v.to("cpu", non_blocking=cuda) for k, v in tensors.items()}
        self.event = torch.cuda.Event() if cuda else None
        if self.event is not None:
            self.event.record()

    def ready(self) -> tuple[dict[str, torch.Tensor], list[Item], tuple[int, int] | None]:
        if self.event is not None:
            self.event.synchronize()
        return self.tensors, self.items, self.bucket


def encode(src: str | os.PathLike, out: str | os.PathLike, vae: str | os.PathLike | Autoencoder,
           resolution: int | tuple[int, int], **options: Any) -> EncodeSummary:
    """Encode every image under `src` into the latent store `out`; rerun to resume or to add new images.

    `vae` is a spec for `load_autoencoder` ("pixel", "builtin", a diffusers folder, a hub id), loaded on
    `device` in `vae_dtype`, or a ready `Autoencoder`. `text_encoder` ("MODEL[:PRETRAINED]" of open_clip, or
    a `latentpatch.text.TextEncoder`) caches each caption's embedding in the store (a rerun keeps the
    store's encoder). The options (keyword only) are the fields of `EncodeOptions`, described there.
    """
    unknown = sorted(set(options) - {f.name for f in fields(EncodeOptions)})
    if unknown:  # said as a function with these keywords would say it
        raise TypeError(f"encode() got an unexpected keyword argument {unknown[0]!r}")
    return encode_store(src, out, vae, resolution, EncodeOptions(**options))


encode.__signature__ = inspect.signature(encode).replace(  # what help() and IDEs show: one keyword per option
    parameters=[*list(inspect.signature(encode).parameters.values())[:4], *api_parameters()])


def encode_store(src: str | os.PathLike, out: str | os.PathLike, vae: str | os.PathLike | Autoencoder,
                 resolution: int | tuple[int, int], opts: EncodeOptions) -> EncodeSummary:
    """`encode` with its options as one checked `EncodeOptions` (what the CLI builds)."""
    start = time.perf_counter()
    src, out, size = Path(src), Path(out), as_size(resolution)
    opts.check()
    if not src.exists():
        raise UserError(f"image folder {src} does not exist")
    if not src.is_dir():
        raise UserError(f"{src} is not a folder; pass the folder that holds the images")
    files = scan_sources(src, exclude=out)  # every file is encoded or named in the skip report
    if not any(is_image_name(f) for f in files):
        raise UserError(f"no images found in {src} (looked for {', '.join(IMAGE_EXTENSIONS)}, in subfolders too)")
    captions = read_captions(src, files)
    autoencoder = _load(vae, opts.device, opts.vae_dtype)
    check_resolution(size, autoencoder.info.factor)
    sizes = _bucket_sizes(size, autoencoder.info.factor, opts)
    lock = lock_folder(out, LOCK_NAME, "encode")
    try:
        manifest = _open_store(out, autoencoder, size, opts, sizes)
        if opts.labels == "folders":
            _set_class_names(manifest, files, src)
        text = open_store_text(out, manifest, opts.text_encoder, autoencoder.device)
        if text is not None:
            opts = replace(opts, extra_tensors=with_text_rows(opts.extra_tensors, text, TORCH_DTYPES[opts.dtype]))
        return _update_store(src, out, files, captions, autoencoder, manifest, size, sizes, opts, start)
    finally:
        lock.release()


def _bucket_sizes(size: tuple[int, int], factor: int, opts: EncodeOptions) -> list[tuple[int, int]] | None:
    """The buckets an image may go to (None: one size for all); the step defaults to factor x 2, a DiT patch."""
    if not opts.buckets:
        return None
    if size[0] != size[1]:
        raise UserError(f"--buckets takes one --resolution R, the side of the buckets' area R x R; got {size}")
    step = opts.bucket_step or default_bucket_step(factor)
    check_bucket_options(size[0], step, factor)
    return bucket_sizes(size[0], step, opts.max_aspect)


def class_of(rel: str) -> str:
    return rel.split("/", 1)[0]


def _set_class_names(manifest: Manifest, files: list[str], src: Path) -> None:
    """Classes are the sorted top-level subfolders; they are fixed once the store has them."""
    top = [f for f in files if "/" not in f and is_image_name(f)]
    if top:
        raise UserError(f"--labels folders needs every image in a class subfolder of {src}; {top[0]} is not")
    names = sorted({class_of(f) for f in files if "/" in f})
    known = manifest.class_names
    if known is not None and known != names:
        raise UserError(f"the class folders of {src} ({', '.join(names)}) differ from the store's "
                        f"({', '.join(known)}); encode into a new --out")
    manifest.extra["class_names"] = names


def _load(vae: Any, device: str | None, vae_dtype: str | None) -> Autoencoder:
    if not isinstance(vae, (str, os.PathLike)):
        return vae  # already an Autoencoder
    return load_autoencoder(str(vae), device=resolve_device(device), dtype=vae_dtype)


def _open_store(out: Path, autoencoder: Autoencoder, size: tuple[int, int], opts: EncodeOptions,
                sizes: list[tuple[int, int]] | None) -> Manifest:
    """The store's manifest, or a new one; a store made with other settings is refused, saying what differs."""
    info = autoencoder.info
    bucketed = sizes is not None
    wanted = Manifest(
        autoencoder=info.to_dict(),
        resolution=list(size),
        latent_shape=[info.latent_channels, size[0] // info.factor, size[1] // info.factor],
        dtype=opts.dtype,
        stores_std=info.kind == "kl" and opts.store == "mean-std",
        store=opts.store,
        flip=opts.flip,
        buckets=[] if bucketed else None,
        bucket_step=(opts.bucket_step or default_bucket_step(info.factor)) if bucketed else None,
        max_aspect=opts.max_aspect if bucketed else None,
    )
    manifest = read_manifest(out) if (out / MANIFEST_NAME).exists() else wanted
    if not manifest.bucketed and bucketed:
        raise UserError(f"{out} is a single-size store (images centre-cropped to {size[1]}x{size[0]}); it cannot take "
                        "aspect buckets: drop --buckets, or encode into a new --out")
    if manifest.bucketed and not bucketed:
        raise UserError(f"{out} is a store of aspect buckets (encode --buckets); add --buckets to extend it, or "
                        "encode into a new --out")
    differences = manifest.differences(wanted)
    if differences:
        raise UserError(
            f"{out} is a latent store made with other settings:\n  " + "\n  ".join(differences)
            + "\nencode into a new --out, or rerun with the store's settings"
        )
    return manifest


def _update_store(
    src: Path, out: Path, files: list[str], captions: dict[str, str | None], autoencoder: Autoencoder,
    manifest: Manifest, size: tuple[int, int], sizes: list[tuple[int, int]] | None, opts: EncodeOptions,
    start: float,
) -> EncodeSummary:
    orphans = remove_orphan_shards(out, manifest)
    plan = plan_update(manifest, src, files, captions, rehash=opts.rehash, upscale_small=opts.upscale_small)
    emptied = manifest.drop_unused_buckets()  # buckets whose images all changed shape: only stale rows left
    if emptied:  # written at once, so no new shard takes the name of a file that a manifest on disk still names
        write_manifest(out, manifest)
        remove_orphan_shards(out, manifest)
    summary = EncodeSummary(
        out=str(out), total=manifest.count, encoded=0, images_encoded=0, already_present=plan.unchanged,
        changed=plan.changed, skipped={}, skipped_files=[], converted={}, captions_updated=plan.captions_updated,
        missing_sources=plan.missing, orphans_removed=orphans, elapsed_s=0.0, encode_s=0.0, images_per_s=0.0,
        up_to_date=not (plan.todo or plan.dirty or orphans or emptied),
    )
    if plan.todo:
        started = time.perf_counter()
        _encode_files(src, out, plan.todo, captions, manifest, autoencoder, size, sizes, opts, summary)
        summary.encode_s = time.perf_counter() - started
        summary.images_per_s = summary.encoded / summary.encode_s
    manifest.skipped = plan.remembered_skips + summary.skipped_files
    summary.skipped_files = [{k: s[k] for k in ("file", "reason", "detail")} for s in manifest.skipped]
    summary.skipped = dict(Counter(s["reason"] for s in manifest.skipped))
    summary.total = manifest.count
    if manifest.bucketed:
        summary.buckets, summary.kept_share = _bucket_report(manifest)
    summary.elapsed_s = time.perf_counter() - start
    if not summary.up_to_date:  # a run that found nothing to do writes nothing
        write_manifest(out, manifest)
        summary.report = str(out / REPORT_NAME)
        write_json_atomic(out / REPORT_NAME, summary.to_report())
    return summary


def _bucket_report(manifest: Manifest) -> tuple[list[dict[str, Any]], float | None]:
    """Items per bucket, and the mean share of an image's pixels that its bucket keeps."""
    counts = Counter(i.bucket for i in manifest.items)
    buckets = [{"size": list(b), "items": counts[k]} for k, b in enumerate(manifest.buckets or [])]
    shares = [kept_share(*i.image_size, manifest.buckets[i.bucket]) for i in manifest.items if i.image_size]
    return buckets, (round(sum(shares) / len(shares), 6) if shares else None)


def _encode_files(
    src: Path, out: Path, todo: list[str], captions: dict[str, str | None], manifest: Manifest,
    autoencoder: Autoencoder, size: tuple[int, int], sizes: list[tuple[int, int]] | None, opts: EncodeOptions,
    summary: EncodeSummary,
) -> None:
    """Decode in workers, transform and encode on the device (one call per bucket in a batch), hand rows to the
    shard writer.

    Skipped files go to `summary.skipped_files` with their size and mtime, so a rerun need not decode them.
    """
    views = (False, True) if opts.flip else (False,)
    classes = {name: i for i, name in enumerate(manifest.class_names or [])}
    loader = DataLoader(
        _SourceFiles(src, todo), batch_size=math.ceil(opts.batch_size / len(views)), shuffle=False,
        num_workers=opts.decode_workers, collate_fn=list, prefetch_factor=4 if opts.decode_workers else None,
        pin_memory=torch.device(autoencoder.device).type == "cuda",
    )
    converted: Counter[str] = Counter()
    writer = StoreWriter(out, manifest, opts.shard_size or _default_shard_size(manifest))
    bar = tqdm(total=len(todo), unit="img", disable=not opts.progress, desc="encode", dynamic_ncols=True)
    pending: list[_Pending] = []
    try:
        for batch in loader:
            groups: dict[tuple[int, int] | None, tuple[list[torch.Tensor], list[Item]]] = {}
            for rel, stat, decoded in batch:
                size_bytes, mtime_ns = stat or (None, None)
                bucket = None
                if sizes is not None and decoded.image is not None:
                    bucket = sizes[nearest_bucket(*decoded.image.shape[-2:], sizes)]
                reason, detail = _skip_reason(decoded, bucket or size, opts.upscale_small, bucket is not None)
                if reason is not None:
                    summary.skipped_files.append(
                        {"file": rel, "size": size_bytes, "mtime_ns": mtime_ns, "reason": reason, "detail": detail}
                    )
                    continue
                if decoded.mode != "RGB":
                    converted[decoded.mode] += 1
                images, items = groups.setdefault(bucket, ([], []))
                images.append(decoded.image)
                label = classes.get(class_of(rel)) if classes else None
                items += [Item(rel, decoded.sha256, captions[rel], f, -1, -1, size_bytes, mtime_ns, label,
                               image_size=None if bucket is None else list(decoded.image.shape[-2:]))
                          for f in views]
            queued = [_Pending(_encode_batch(autoencoder, images, items, bucket or size, opts), items, bucket)
                      for bucket, (images, items) in groups.items()]
            if queued:
                for done in pending:
                    _store_rows(writer, *done.ready())
                pending = queued
            for images, items in groups.values():
                summary.encoded += len(items)
                summary.images_encoded += len(images)
            bar.update(len(batch))
    except torch.cuda.OutOfMemoryError as e:
        raise UserError(
            f"out of GPU memory at --batch-size {opts.batch_size}; lower it and rerun (finished shards are kept)"
        ) from e
    finally:
        bar.close()
        try:
            for done in pending:
                _store_rows(writer, *done.ready())
        finally:
            writer.close()  # also on Ctrl-C: rows already encoded are written, not lost
    summary.converted = dict(converted)


def _skip_reason(decoded: DecodedImage, size: tuple[int, int], upscale_small: bool,
                 bucketed: bool) -> tuple[str | None, str]:
    if decoded.skip is not None:
        return decoded.skip, decoded.detail
    h, w = decoded.image.shape[-2:]
    if not upscale_small and not covers(h, w, size):
        target = "its bucket" if bucketed else "the resolution"
        return SMALLER, f"{w}x{h} px; {target} is {size[1]}x{size[0]} (--upscale-small allows it)"
    return None, ""


def _default_shard_size(manifest: Manifest) -> int:
    row = math.prod(manifest.latent_shape) * TORCH_DTYPES[manifest.dtype].itemsize * (2 if manifest.stores_std else 1)
    if manifest.text_encoder:  # cached caption embeddings: tokens and pooled in the storage dtype, mask, hash
        t = manifest.text_encoder
        row += (t["max_length"] * t["width"] + t["pooled_dim"]) * TORCH_DTYPES[manifest.dtype].itemsize
        row += t["max_length"] + 8
    return min(4096, max(1, SHARD_BYTES // row))


def _encode_batch(autoencoder, images, items: list[Item], size, opts: EncodeOptions) -> dict[str, torch.Tensor]:
    pixels = resize_center_crop(images, size, autoencoder.device)
    if opts.flip:  # rows in item order: image, its mirror, next image, ...
        pixels = torch.stack([pixels, pixels.flip(-1)], dim=1).flatten(0, 1)
    storage = TORCH_DTYPES[opts.dtype]
    with torch.no_grad():
        mean, std = autoencoder.encode_moments(pixels)
        if std is not None and opts.store == "sample":
            mean, std = mean + std * _item_noise(items, opts.seed, mean), None
        tensors = {"mean": mean.to(storage)}
        if std is not None:
            tensors["std"] = std.to(storage)
        if opts.extra_tensors is not None:
            tensors.update(opts.extra_tensors(items))
    return tensors


def _store_rows(writer: StoreWriter, tensors: dict[str, torch.Tensor], items: list[Item],
                bucket: tuple[int, int] | None) -> None:
    """Hand a batch to the shard writer, recording each item's latent moments [E z, E z^2] first: the store's
    latent std (manifest.latent_std), which training takes as EDM's sigma_data, follows from them."""
    mean = tensors["mean"].float().flatten(1)
    second = mean.square().mean(1)
    if "std" in tensors:  # z = mean + std * eps: E z^2 = mean^2 + std^2
        second = second + tensors["std"].float().flatten(1).square().mean(1)
    for item, m1, m2 in zip(items, mean.mean(1).tolist(), second.tolist()):
        item.moments = [float(f"{m1:.6g}"), float(f"{m2:.6g}")]
    writer.add(tensors, items, bucket)


def _item_noise(items: list[Item], seed: int, like: torch.Tensor) -> torch.Tensor:
    """One generator per item, seeded by (seed, file hash, flip): a stored sample does not depend on batching."""
    noise = [
        torch.randn(like.shape[1:], generator=torch.Generator().manual_seed(_item_seed(seed, i))) for i in items
    ]
    return torch.stack(noise).to(like.device, like.dtype)


def _item_seed(seed: int, item: Item) -> int:
    return derive_seed(seed, item.sha256, item.flip, "posterior-sample")
