"""What the encode stage takes besides its folders (EncodeOptions) and what it reports (EncodeSummary)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from latentpatch.data.manifest import STORAGE_DTYPES, STORE_MODES, Item
from latentpatch.errors import UserError

REPORT_NAME = "encode_report.json"

ExtraTensors = Callable[[list[Item]], dict[str, torch.Tensor]]


def default_workers() -> int:
    """Up to 4 decoding processes, never more than the CPUs this process may use."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(4, cpus)


@dataclass
class EncodeOptions:
    """Everything `encode` takes besides the folders, the autoencoder and the resolution (see the CLI's --help)."""

    batch_size: int = 32  # images per autoencoder call; with flip each file gives two
    dtype: str = "float16"  # storage dtype
    flip: bool = False
    workers: int = field(default_factory=default_workers)
    store: str = "mean-std"
    seed: int = 0
    upscale_small: bool = False
    shard_size: int | None = None  # None: 4096 items, fewer if a shard would pass SHARD_BYTES
    rehash: bool = False
    extra_tensors: ExtraTensors | None = None  # items -> {name: tensor with one row per item}, stored alongside
    progress: bool = False
    labels: str | None = None  # "folders": the class of an image is its top-level subfolder

    def check(self) -> None:
        if self.batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.workers < 0:
            raise UserError(f"--workers must be 0 (decode in this process) or more, got {self.workers}")
        if self.shard_size is not None and self.shard_size < 1:
            raise UserError(f"--shard-size must be at least 1, got {self.shard_size}")
        if self.store not in STORE_MODES:
            raise UserError(f"--store must be one of {', '.join(STORE_MODES)}, got {self.store!r}")
        if self.dtype not in STORAGE_DTYPES:
            raise UserError(f"--dtype must be one of {', '.join(STORAGE_DTYPES)}, got {self.dtype!r}")
        if self.labels not in (None, "folders"):
            raise UserError(f"--labels must be 'folders' (class = top-level subfolder), got {self.labels!r}")


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

    def lines(self) -> list[str]:
        if self.up_to_date:
            return [f"store is up to date: {self.total} images in {self.out}"] + self._skip_lines()
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
        return out + self._skip_lines()

    def _skip_lines(self) -> list[str]:
        if not self.skipped:
            return []
        counts = ", ".join(f"{reason} {n}" for reason, n in sorted(self.skipped.items()))
        report = self.report or str(Path(self.out) / REPORT_NAME)
        n = sum(self.skipped.values())
        return [f"skipped {n} file{'s' if n != 1 else ''} ({counts}); list in {report}"]
