"""Image folders: find the images, read their captions, decode each file to an RGB uint8 tensor.

Captions follow the Hugging Face imagefolder conventions (`metadata.jsonl` / `metadata.csv` with
`file_name` and `text`, `file_name` relative to the metadata file's folder), plus a sidecar `NAME.txt`
next to `NAME.png`. Decoding never raises for a bad file: it returns a skip reason instead, so one broken
image cannot stop an encode.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image, ImageOps

from latentpatch.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif")  # a GIF gives its first frame
METADATA_FILES = ("metadata.jsonl", "metadata.csv")

# Skip reasons: short fixed keys, so the summary can count them; the detail goes in the report.
EMPTY = "empty file"
TRUNCATED = "truncated image"
NOT_AN_IMAGE = "not a decodable image"
UNREADABLE = "unreadable file"
TOO_LARGE = "too large to decode safely"
SMALLER = "smaller than resolution"

_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _walk(src: Path, excluded: Path | None):
    """(relative POSIX path, name) of every non-hidden file under src, sorted, skipping `excluded`."""
    for root, dirs, files in os.walk(src):
        root_path = Path(root)
        dirs[:] = sorted(
            d for d in dirs if not d.startswith(".") and (excluded is None or (root_path / d).resolve() != excluded)
        )
        for name in sorted(files):
            if not name.startswith("."):
                yield (root_path / name).relative_to(src).as_posix(), name


def is_image_name(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def scan_images(src: str | os.PathLike, exclude: str | os.PathLike | None = None) -> list[str]:
    """Relative POSIX paths of every image file (by extension) under `src`, sorted; hidden files and folders are
    left out. `exclude` is a folder inside `src` to ignore (the store itself, when it lives inside the images)."""
    excluded = Path(exclude).resolve() if exclude is not None else None
    return sorted(rel for rel, name in _walk(Path(src), excluded) if is_image_name(name))


def scan_sources(src: str | os.PathLike, exclude: str | os.PathLike | None = None) -> list[str]:
    """Every file an encode must account for (encode it, or name it in the skip report with the reason):
    all non-hidden files but the captions (NAME.txt beside an image, metadata.jsonl / metadata.csv)."""
    excluded = Path(exclude).resolve() if exclude is not None else None
    found = list(_walk(Path(src), excluded))
    images = {rel for rel, name in found if is_image_name(name)}
    stems = {str(PurePosixPath(rel).with_suffix("")) for rel in images}
    def is_caption(rel: str, name: str) -> bool:
        return name in METADATA_FILES or (name.lower().endswith(".txt") and str(PurePosixPath(rel).with_suffix(""))
                                          in stems)
    return sorted(rel for rel, name in found if rel in images or not is_caption(rel, name))


def list_image_files(folder: str | os.PathLike, what: str = "image folder") -> list[Path]:
    """The image files of a folder (subfolders too) as paths, or a UserError when there are none."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{what} {folder} does not exist")
    files = [folder / rel for rel in scan_images(folder)]
    if not files:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {folder}")
    return files


def read_image(path: str | os.PathLike) -> torch.Tensor:
    """uint8 [3, H, W] RGB of one image file (decoded as encode decodes), or a UserError naming the file."""
    decoded = decode_file(path)
    if decoded.image is None:
        raise UserError(f"could not read image {path}: {decoded.skip} ({decoded.detail})")
    return decoded.image


def read_captions(src: str | os.PathLike, files: list[str]) -> dict[str, str | None]:
    """Caption per relative path: a metadata file's `text` wins over a sidecar `NAME.txt`; None if neither."""
    src = Path(src)
    captions: dict[str, str | None] = {f: None for f in files}
    for f in files:
        sidecar = src / PurePosixPath(f).with_suffix(".txt")
        if sidecar.is_file():
            try:
                captions[f] = sidecar.read_text(encoding="utf-8").strip()
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"could not read caption file {sidecar}: {e}") from e
    for meta in _metadata_files(src):
        base = PurePosixPath(meta.parent.relative_to(src).as_posix())
        for file_name, text in _read_metadata(meta):
            rel = _normalise(base / file_name)
            if rel in captions:
                captions[rel] = text
    return captions


def _metadata_files(src: Path) -> list[Path]:
    metas = []
    for root, dirs, files in os.walk(src):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        present = [name for name in METADATA_FILES if name in files]
        if len(present) > 1:
            raise UserError(f"both metadata.jsonl and metadata.csv in {root}: keep one of them")
        metas += [Path(root) / name for name in present]
    return metas


def _read_metadata(path: Path) -> list[tuple[str, str | None]]:
    """(file_name, text) rows; a file without a `text` column gives no captions."""
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"could not read {path}: {e}") from e
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(raw.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{path} line {n} is not valid JSON: {e.msg}") from e
            if not isinstance(row, dict) or "file_name" not in row:
                raise UserError(f"{path} line {n} has no 'file_name' field")
            rows.append((n, row))
    else:
        reader = csv.DictReader(io.StringIO(raw))
        if "file_name" not in (reader.fieldnames or []):
            raise UserError(f"{path} has no 'file_name' column (columns: {reader.fieldnames})")
        rows = list(enumerate(reader, start=2))
    out = []
    for n, row in rows:
        text = row.get("text")
        if text is not None and not isinstance(text, str):
            text = str(text)
        out.append((str(row["file_name"]), text))
    return out


def _normalise(path: PurePosixPath) -> str:
    """Collapse `a/./b` and `a/../b` so metadata paths match scanned paths; paths leaving the folder stay odd."""
    return os.path.normpath(path.as_posix()).replace(os.sep, "/")


@dataclass
class DecodedImage:
    """One source file after decoding: the image, or why it was skipped."""

    image: torch.Tensor | None  # uint8 [3, H, W], RGB
    mode: str | None  # the file's PIL mode before conversion to RGB
    sha256: str | None  # of the bytes that were decoded
    skip: str | None = None  # one of the reason keys above
    detail: str = ""

    def pin_memory(self) -> DecodedImage:
        """Called by a DataLoader with pin_memory=True, so the copy to the GPU can run asynchronously."""
        image = None if self.image is None else self.image.pin_memory()
        return DecodedImage(image, self.mode, self.sha256, self.skip, self.detail)


def decode_file(path: str | os.PathLike) -> DecodedImage:
    """Read a file once, hash the bytes, decode them; any failure becomes a skip reason, never an exception."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        return DecodedImage(None, None, None, UNREADABLE, e.strerror or str(e))
    sha = hashlib.sha256(data).hexdigest()
    if not data:
        return DecodedImage(None, None, sha, EMPTY, "0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image, mode = decode_bytes(data)
    except Image.UnidentifiedImageError:
        return DecodedImage(None, None, sha, NOT_AN_IMAGE, "PIL cannot identify the file's format")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        return DecodedImage(None, None, sha, TOO_LARGE, str(e))
    except Exception as e:  # noqa: BLE001 - any decoder failure is a property of the file, not of the run
        reason = TRUNCATED if "truncated" in str(e) else NOT_AN_IMAGE
        return DecodedImage(None, None, sha, reason, f"{type(e).__name__}: {e}")
    return DecodedImage(image, mode, sha)


def decode_bytes(data: bytes) -> tuple[torch.Tensor, str]:
    """Decode to uint8 [3, H, W] RGB, honouring EXIF orientation; returns the original mode too.

    Alpha is composited on white (what a viewer shows), 16-bit greyscale is scaled to 8 bits, and every other
    mode (L, 1, P, CMYK, ...) goes through PIL's own conversion to RGB.
    """
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        mode = im.mode
        im = ImageOps.exif_transpose(im)
        if mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")
        if im.mode in _ALPHA_MODES:
            rgba = im.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb = Image.alpha_composite(white, rgba).convert("RGB")
        elif im.mode in _SIXTEEN_BIT_MODES:
            grey = np.asarray(im).astype(np.float64) / 257.0
            rgb = Image.fromarray(np.clip(np.rint(grey), 0, 255).astype(np.uint8), "L").convert("RGB")
        else:
            rgb = im.convert("RGB")
        array = np.array(rgb, dtype=np.uint8)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous(), mode
