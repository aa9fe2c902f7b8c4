"""Atomic writes (a reader, a resumed job or a crash never sees a half-written file) and the folder lock."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock, Timeout
from safetensors.torch import save as save_safetensors_bytes

from latentpatch.errors import UserError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise UserError(f"could not write {path}: {e.strerror or e} (nothing was left half-written)") from e


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=False) + "\n")


def atomic_save_safetensors(
    tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """safetensors needs contiguous CPU tensors; serialise in memory, then write atomically."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(path, save_safetensors_bytes(flat, metadata=metadata))


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def lock_folder(folder: str | os.PathLike, lock_name: str, what: str) -> FileLock:
    """Create `folder` and hold its lock file `lock_name`, non-blocking, so a second `what` into it fails at once.

    The one folder lock of every stage (an encode's store, a train's run folder, a sample job's folder): two
    writers would mix or delete each other's files. Once it is held no other writer of this folder is live, so the
    leftovers of a killed one's atomic writes are removed (remove_temp_files). Every stage's `lock_name` ends in
    `.lock`. The caller releases the returned lock.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--out {folder} is a file; pass a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder {folder}: {e.strerror or e}") from e
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"the output folder {folder} is not writable")
    lock = FileLock(folder / lock_name)
    try:
        lock.acquire(blocking=False)
    except Timeout:
        raise UserError(
            f"another {what} is writing to {folder} (it holds {folder / lock_name}); wait for it to finish or pick "
            "another --out"
        ) from None
    except OSError as e:
        raise UserError(f"the output folder {folder} is not writable: {e.strerror or e}") from e
    remove_temp_files(folder)
    return lock


def remove_temp_files(folder: Path) -> None:
    """Delete what a killed atomic write left (`.NAME.XXXX.tmp`; the file it was replacing still stands) in
    `folder` and its subfolders, but not in a subfolder another stage locks (it holds a `*.lock` file, e.g. a sample
    job written into a run folder): that stage may be writing there now, and cleans it when it takes its lock."""
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not any(Path(root, d).glob("*.lock"))]
        for name in files:
            if name.startswith(".") and name.endswith(".tmp"):
                Path(root, name).unlink(missing_ok=True)
