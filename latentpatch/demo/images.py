"""The demo's captioned data set: crops of pictures that scikit-image ships, named by their caption.

Four captions that differ in colour and texture, so a few minutes of CPU training can learn to follow
them and a person (or a test) can see that it did.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

# caption -> (skimage.data function, RGB tint for grayscale textures or None, downscale before cropping)
DEMO_SOURCES: dict[str, tuple[str, tuple[float, float, float] | None, int]] = {
    "red brick wall": ("brick", (1.0, 0.35, 0.25), 2),
    "green grass": ("grass", (0.45, 1.0, 0.3), 2),
    "blue gravel": ("gravel", (0.3, 0.45, 1.0), 2),
    "starry night sky": ("hubble_deep_field", None, 2),
}


def _source_image(name: str, tint: tuple[float, float, float] | None, downscale: int) -> np.ndarray:
    import skimage.data

    img = np.asarray(getattr(skimage.data, name)())
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    img = img[..., :3].astype(np.float32)
    if tint is not None:
        img = img * np.asarray(tint, dtype=np.float32)
    pil = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    if downscale > 1:
        pil = pil.resize((pil.width // downscale, pil.height // downscale), Image.Resampling.LANCZOS)
    return np.asarray(pil)


def make_demo_images(folder: str | Path, per_caption: int = 64, size: int = 64, seed: int = 0) -> dict[str, int]:
    """Write `per_caption` random crops per caption as PNGs plus a metadata.jsonl; returns counts."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines, counts = [], {}
    for c, (caption, (name, tint, down)) in enumerate(DEMO_SOURCES.items()):
        img = _source_image(name, tint, down)
        h, w = img.shape[:2]
        for i in range(per_caption):
            top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
            crop = img[top : top + size, left : left + size]
            file = f"{name}_{i:03d}.png"
            Image.fromarray(crop).save(folder / file)
            lines.append(json.dumps({"file_name": file, "text": caption}))
        counts[caption] = per_caption
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return counts
