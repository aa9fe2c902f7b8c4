"""What the encode stage takes besides its folders (EncodeOptions) and what it reports (EncodeSummary)."""

from __future__ import annotations

import inspect
import math
import os
import typing
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional

import torch

from latentpatch.data.buckets import MAX_ASPECT
from latentpatch.data.manifest import STORAGE_DTYPES, STORE_MODES, Item
from latentpatch.errors import UserError

REPORT_NAME = "encode_report.json"

ExtraTensors = Callable[[list[Item]], dict[str, torch.Tensor]]


def default_workers() -> int:
    """Up to 4 decoding processes, never more than the CPUs this process may use."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(4, cpus)


def _option(default: Any, help: str, *, negatable: bool = False, cli: bool = True, cli_default: Any = MISSING,
            cli_type: Any = None) -> Any:
    """A field with what the CLI shows for it: `--name` (with `--no-name` when negatable), its help and, where the
    command differs from the API, its default (`cli_default`) or type (`cli_type`); `cli=False`: API only."""
    meta = {"help": help, "negatable": negatable, "cli": cli, "cli_default": cli_default, "cli_type": cli_type}
    return field(default=default, metadata=meta)


@dataclass
class EncodeOptions:
    """Everything `encode` takes besides the folders, the autoencoder and the resolution: the one home of each
    option's name, default, help and check, read by `encode(**options)` and the CLI's `latentpatch encode`."""

    batch_size: int = _option(32, "Images per autoencoder call (a flipped view counts).")
    device: Optional[str] = _option(None, "cpu, cuda or cuda:N (default: cuda when available).")
    vae_dtype: Optional[str] = _option(
        None, "Autoencoder compute dtype: float32, bfloat16 or float16 (default: bfloat16 on CUDA, float32 on CPU).")
    dtype: str = _option("float16", "Storage dtype of the latents: float16, bfloat16 or float32.")
    flip: bool = _option(False, "Also store each image mirrored left-right, as a second item.", negatable=True)
    workers: Optional[int] = _option(
        None, "Background processes decoding files (0: decode in this process; default: up to 4, no more than the "
        "CPUs available).")
    store: str = _option(
        "mean-std", "mean-std: keep the posterior mean and std so training draws a fresh latent per read; sample: "
        "keep one drawn latent (half the size). Autoencoders without a posterior keep the latent.")
    seed: int = _option(0, "Seed for --store sample; each image's draw depends only on it and the file.")
    upscale_small: bool = _option(False, "Upscale images smaller than R (or than their bucket) instead of skipping "
                                  "them.")
    buckets: bool = _option(
        False, "Keep each image's shape: sort the images into aspect-ratio buckets of about R x R pixels (sides "
        "multiples of --bucket-step, long/short at most --max-aspect), each resized to cover the bucket nearest its "
        "shape and centre-cropped by the small remainder.")
    bucket_step: Optional[int] = _option(
        None, "With --buckets: bucket sides are multiples of this many pixels (a multiple of the autoencoder's "
        "factor; default: factor x 2, a DiT patch of 2 latents).")
    max_aspect: float = _option(MAX_ASPECT, "With --buckets: the most elongated bucket's long side / short side "
                                "(a finite number >= 1).")
    shard_size: Optional[int] = _option(
        None, "Items per shard file (default: 4096, fewer if a shard would pass 256 MiB); a kill loses at most the "
        "shard being filled.")
    rehash: bool = _option(False, "Hash every file again instead of trusting an unchanged size and modification time.")
    extra_tensors: Optional[ExtraTensors] = _option(
        None, "items -> {name: tensor with one row per item}, stored alongside the latents.", cli=False)
    text_encoder: Any = _option(
        None, "Cache caption embeddings for text-conditioned training: an open_clip MODEL[:PRETRAINED], e.g. "
        "ViT-B-32:laion2b_s34b_b79k (a tag or a checkpoint file; MODEL may be a model config .json). Recorded in "
        "the manifest; a rerun keeps the store's encoder. Uncaptioned images get the empty caption.",
        cli_type=Optional[str])  # in Python also a ready latentpatch.text.TextEncoder
    labels: Optional[str] = _option(
        None, "'folders': store a class label per image, its top-level subfolder (sorted names -> 0..K-1, recorded "
        "as class_names), for class-conditional training (model.num_classes=K).")
    progress: bool = _option(False, "Show a progress bar with images/s.", negatable=True, cli_default=True)

    @property
    def decode_workers(self) -> int:
        return default_workers() if self.workers is None else self.workers

    def check(self) -> None:
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.workers is not None and self.workers < 0:
            raise UserError(f"--workers must be 0 (decode in this process) or more, got {self.workers}")
        if self.shard_size is not None and self.shard_size < 1:
            raise UserError(f"--shard-size must be at least 1, got {self.shard_size}")
        if self.store not in STORE_MODES:
            raise UserError(f"--store must be one of {', '.join(STORE_MODES)}, got {self.store!r}")
        if self.dtype not in STORAGE_DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(STORAGE_DTYPES)}, got {self.dtype!r}")
        if self.vae_dtype is not None and self.vae_dtype not in STORAGE_DTYPES:
            raise UserError(f"--vae-dtype must be one of {', '.join(STORAGE_DTYPES)}, got {self.vae_dtype!r}")
        if self.bucket_step is not None and self.bucket_step < 1:
            raise UserError(f"--bucket-step must be at least 1 pixel, got {self.bucket_step}")
        if not 1 <= self.max_aspect < math.inf:
            raise UserError(f"--max-aspect must be a finite number >= 1 (1: square buckets only), got {self.max_aspect}")
        if not self.buckets and (self.bucket_step is not None or self.max_aspect != MAX_ASPECT):
            raise UserError("--bucket-step and --max-aspect shape aspect buckets: add --buckets")
        if self.labels not in (None, "folders"):
            raise UserError(f"--labels must be 'folders' (class = top-level subfolder), got {self.labels!r}")


def cli_parameters() -> list[inspect.Parameter]:
    """The options of `latentpatch encode`, as Typer reads them from a command's signature: one per field."""
    import typer

    hints = typing.get_type_hints(EncodeOptions)
    params = []
    for f in fields(EncodeOptions):
        meta = f.metadata
        if not meta["cli"]:
            continue
        flag = "--" + f.name.replace("_", "-")
        decl = f"{flag}/--no-{flag[2:]}" if meta["negatable"] else flag
        default = f.default if meta["cli_default"] is MISSING else meta["cli_default"]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY,
                                        default=typer.Option(default, decl, help=meta["help"]),
                                        annotation=meta["cli_type"] or hints[f.name]))
    return params


def api_parameters() -> list[inspect.Parameter]:
    """The keyword parameters of `encode(...)`, with the API's defaults: one per field."""
    hints = typing.get_type_hints(EncodeOptions)
    return [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=f.default, annotation=hints[f.name])
            for f in fields(EncodeOptions)]


@dataclass
class EncodeSummary:
    out: str
    total: int  # items in the store after this run (a flipped view is an item)
    encoded: int  # items written by this run
    images_encoded: int  # source images encoded by this run
    already_present: int  # source images found in the store unchanged
    changed: list[str]  # source images re-encoded because their bytes changed
    skipped: dict[str, int]  # reason -> number of files
    skipped_files: list[dict[str, Any]]  # {file, reason, detail}
    converted: dict[str, int]  # original mode -> images converted to RGB by this run
    captions_updated: int
    missing_sources: int  # source images in the store whose file is gone (their latents are kept)
    orphans_removed: int  # shard files of an interrupted run that were deleted
    elapsed_s: float  # the whole run, loading the autoencoder included
    encode_s: float  # decoding, encoding and writing
    images_per_s: float  # items encoded per second of encode_s
    up_to_date: bool
    report: str | None = None
    buckets: list[dict[str, Any]] | None = None  # a bucketed store: {"size": [H, W], "items": n} per bucket
    kept_share: float | None = None  # a bucketed store: mean share of an image's pixels its bucket keeps

    def to_report(self) -> dict[str, Any]:
        """What encode_report.json holds (the bucket keys only for a bucketed store)."""
        d = asdict(self)
        return d if self.buckets is not None else {k: v for k, v in d.items() if k not in ("buckets", "kept_share")}

    def lines(self) -> list[str]:
        if self.up_to_date:
            return [f"store is up to date: {self.total} images in {self.out}"] + self._bucket_lines() + self._skip_lines()
        out = [
            f"encoded {self.encoded} images ({self.images_encoded} files) into {self.out} in {self.elapsed_s:.1f} s "
            f"({self.encode_s:.1f} s encoding, {self.images_per_s:.1f} images/s); the store holds {self.total}",
            f"already present: {self.already_present}",
        ]
        if self.changed:
            names = ", ".join(self.changed[:5]) + (", ..." if len(self.changed) > 5 else "")
            out.append(f"re-encoded {len(self.changed)} changed files (stale rows dropped): {names}")
        if self.converted:
            out.append("converted to RGB: " + ", ".join(f"{m} {n}" for m, n in sorted(self.converted.items())))
        if self.captions_updated:
            out.append(f"captions updated: {self.captions_updated}")
        if self.missing_sources:
            out.append(f"kept {self.missing_sources} stored images whose source file is gone")
        if self.orphans_removed:
            out.append(f"cleaned up {self.orphans_removed} shard files left by an interrupted run")
        return out + self._bucket_lines() + self._skip_lines()

    def _bucket_lines(self) -> list[str]:
        if not self.buckets:
            return []
        sizes = ", ".join(f"{b['size'][1]}x{b['size'][0]} {b['items']}" for b in self.buckets)
        return [f"buckets (WxH px: images): {sizes}; mean kept share {self.kept_share:.3f} (the rest centre-cropped)"]

    def _skip_lines(self) -> list[str]:
        if not self.skipped:
            return []
        counts = ", ".join(f"{reason} {n}" for reason, n in sorted(self.skipped.items()))
        report = self.report or str(Path(self.out) / REPORT_NAME)
        n = sum(self.skipped.values())
        return [f"skipped {n} file{'s' if n != 1 else ''} ({counts}); list in {report}"]
