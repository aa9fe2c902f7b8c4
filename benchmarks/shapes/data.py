"""A mixed-shape image set from what the packages ship, for the aspect-bucket measurements (issue 23).

  photos: scikit-image's photos (square or about 3:2 landscape), each cut at five aspect ratios H:W (2:1 and 3:2
    portrait, 1:1, 2:3 and 1:2 landscape) at seeded random places, the crop as large as the photo allows
    (at most MAX_SIDE pixels on its longer side);
  faces: scikit-image's lfw_subset() faces (25x25 greyscale), upscaled and padded into portrait (2:3) and
    landscape (3:2) frames of a flat grey, and kept square.

Every tenth image of each kind is held out (`split`). The files are named for their kind and shape, so a
reader of the store's manifest can see what each bucket holds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

ASPECTS = {"2x1": (2, 1), "3x2": (3, 2), "1x1": (1, 1), "2x3": (2, 3), "1x2": (1, 2)}  # name: (H, W)
PHOTOS = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
          "colorwheel", "camera", "moon", "brick", "grass", "gravel", "coins", "clock", "page", "text"]
CROPS_PER_ASPECT = 3
MAX_SIDE = 192
FACE_SIDE = 96  # a face's side in its frame
FRAMES = {"portrait": (144, 96), "landscape": (96, 144), "square": (96, 96)}  # (H, W)


def _rgb(image: np.ndarray) -> Image.Image:
    if image.dtype == bool:
        image = image.astype(np.uint8) * 255
    if image.dtype != np.uint8:
        image = np.round(255 * (image - image.min()) / max(np.ptp(image), 1e-8)).astype(np.uint8)
    if image.ndim == 2:
        image = np.stack([image] * 3, -1)
    return Image.fromarray(image[..., :3])


def _crop(photo: Image.Image, aspect: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """The largest crop of aspect H:W that fits, at a random place, scaled to at most MAX_SIDE on its longer side."""
    w, h = photo.size
    scale = min(h / aspect[0], w / aspect[1])
    ch, cw = int(aspect[0] * scale * 0.9), int(aspect[1] * scale * 0.9)  # 90%: room to place it
    top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    crop = photo.crop((left, top, left + cw, top + ch))
    shrink = min(1.0, MAX_SIDE / max(ch, cw))
    return crop.resize((max(1, round(cw * shrink)), max(1, round(ch * shrink))), Image.Resampling.LANCZOS)


def write_mixed_shapes(folder: Path, seed: int = 0) -> Path:
    """The whole set into `folder` (skipped if already there): photos/<photo>-<aspect>-<k>.png and
    faces/face<i>-<frame>.png."""
    import skimage.data

    if (folder / ".complete").is_file():
        return folder
    rng = np.random.default_rng(seed)
    (folder / "photos").mkdir(parents=True, exist_ok=True)
    (folder / "faces").mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        photo = _rgb(getattr(skimage.data, name)())
        for aspect_name, aspect in ASPECTS.items():
            for k in range(CROPS_PER_ASPECT):
                _crop(photo, aspect, rng).save(folder / "photos" / f"{name}-{aspect_name}-{k}.png")
    faces = skimage.data.lfw_subset()[:100]
    for i, face in enumerate(faces):
        big = _rgb(face).resize((FACE_SIDE, FACE_SIDE), Image.Resampling.LANCZOS)
        for frame, (h, w) in FRAMES.items():
            canvas = Image.new("RGB", (w, h), (118, 118, 118))
            canvas.paste(big, ((w - FACE_SIDE) // 2, (h - FACE_SIDE) // 2))
            canvas.save(folder / "faces" / f"face{i:03d}-{frame}.png")
    (folder / ".complete").write_text("")
    return folder


def split(folder: Path) -> tuple[list[Path], list[Path]]:
    """(train, held-out) files: every tenth file of the sorted list is held out."""
    files = sorted(p for p in folder.rglob("*.png"))
    return [p for i, p in enumerate(files) if i % 10 != 9], [p for i, p in enumerate(files) if i % 10 == 9]


def image_sizes(folder: Path) -> list[tuple[int, int]]:
    """(H, W) of every image of the set."""
    sizes = []
    for p in sorted(folder.rglob("*.png")):
        with Image.open(p) as im:
            sizes.append((im.height, im.width))
    return sizes
