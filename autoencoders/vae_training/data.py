"""Images for training a VAE: the photographs scikit-image ships (offline) or a user's folder, split by image
into training and held-out sets, random crops drawn from them with colour augmentation, and the reference
photographs scikit-learn ships, kept for held-out checks only."""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import kornia
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from latentpatch.errors import UserError

# skimage.data images bundled in the wheel (no pooch download): photographs, micrographs and textures.
# `cat` is `chelsea`, `motorcycle_left` is `stereo_motorcycle()[0]`; synthetic ones (checkerboard, blobs) are left out.
SKIMAGE_IMAGES = (
    "astronaut", "brick", "camera", "cell", "chelsea", "clock", "coffee", "coins", "colorwheel", "grass",
    "gravel", "hubble_deep_field", "immunohistochemistry", "moon", "motorcycle_left", "page", "retina",
    "rocket", "text",
)
# Held out first, in this order, so `holdout=K` always means the same K images: a colour photograph,
# a greyscale photograph and a texture, then more of each kind.
SKIMAGE_HOLDOUT_ORDER = ("coffee", "camera", "gravel", "rocket", "coins", "grass")
# Pyramid levels a crop may come from, so one crop sees objects at more than one scale.
SCALES = (1.0, 1 / math.sqrt(2), 0.5)
# scikit-learn's two sample photographs (china.jpg, flower.jpg, 427 x 640): never trained on, the reference set.
REFERENCE_IMAGES = ("china", "flower")
VAE_EXTRA = "pip install 'latentpatch[vae]'"
GREY_SPREAD = 0.02  # a crop whose channels never differ by more than this (on [-1, 1]) counts as greyscale


def load_skimage_image(name: str) -> Tensor:
    """One bundled skimage.data image as uint8 [3, H, W] RGB (greyscale repeated)."""
    import skimage.data

    array = skimage.data.stereo_motorcycle()[0] if name == "motorcycle_left" else getattr(skimage.data, name)()
    array = np.asarray(array)
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    return torch.from_numpy(np.ascontiguousarray(array[:, :, :3])).permute(2, 0, 1).contiguous()


def load_reference_images() -> dict[str, Tensor]:
    """scikit-learn's sample photographs as uint8 [3, H, W] RGB, by name (china, flower)."""
    try:
        from sklearn.datasets import load_sample_images
    except ImportError as e:
        raise UserError(f"the held-out reference photographs come from scikit-learn, which is not installed; "
                        f"{VAE_EXTRA} (or turn the check off with --no-reference-check)") from e
    found = load_sample_images()
    names = [Path(f).stem for f in found.filenames]
    return {n: torch.from_numpy(np.array(a[:, :, :3])).permute(2, 0, 1).contiguous()
            for n, a in zip(names, found.images)}


def load_folder_images(folder: str | os.PathLike, min_side: int, max_side: int) -> dict[str, Tensor]:
    """Every decodable image under `folder` (recursive), by relative path, downscaled to at most `max_side`;
    images smaller than `min_side` are skipped with a warning."""
    from latentpatch.data.images import decode_file, scan_images

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"--data {folder} is not a folder of images")
    found, skipped = {}, []
    for rel in scan_images(folder):
        decoded = decode_file(folder / rel)
        if decoded.image is None or min(decoded.image.shape[1:]) < min_side:
            skipped.append(rel)
            continue
        found[rel] = fit_side(decoded.image, max_side)
    if skipped:
        warnings.warn(f"skipped {len(skipped)} unreadable or smaller than {min_side} px images in {folder}, "
                      f"e.g. {skipped[0]}", stacklevel=2)
    if not found:
        raise UserError(f"--data {folder} holds no readable image of at least {min_side} x {min_side} pixels")
    return found


def fit_side(image: Tensor, max_side: int) -> Tensor:
    """Downscale uint8 [3,H,W] (antialiased) so its longer side is at most max_side; huge photos have little
    detail per 64-pixel crop at full size."""
    h, w = image.shape[1:]
    if max(h, w) <= max_side:
        return image
    s = max_side / max(h, w)
    return resize(image.float(), round(h * s), round(w * s)).round().clamp(0, 255).to(torch.uint8)


def resize(image: Tensor, h: int, w: int) -> Tensor:
    return F.interpolate(image[None], size=(h, w), mode="bilinear", antialias=True, align_corners=False)[0]


def split_holdout(names: list[str], k: int, seed: int, order: tuple[str, ...] = ()) -> tuple[list[str], list[str]]:
    """(train, held out) by image: names in `order` are held out first, the rest drawn with `seed`."""
    if k < 0 or k >= len(names):
        raise UserError(f"--holdout {k} must be at least 0 and leave an image to train on (there are {len(names)})")
    preferred = [n for n in order if n in names]
    rest = sorted(n for n in names if n not in preferred)
    perm = torch.randperm(len(rest), generator=torch.Generator().manual_seed(seed)).tolist()
    held = (preferred + [rest[i] for i in perm])[:k]
    return [n for n in sorted(names) if n not in held], held


def to_model_range(image: Tensor) -> Tensor:
    """uint8 [3,H,W] -> float32 in [-1, 1], the autoencoders' image range."""
    return image.float() / 127.5 - 1.0


@dataclass
class CropSampler:
    """Random square crops, an image chosen uniformly (small and large images count alike), then a pyramid level
    from SCALES, a position and a left-right flip, all from one generator."""

    levels: list[list[Tensor]]  # per image: float [3,h,w] in [-1,1] at each scale at least `crop` on its short side
    crop: int

    @classmethod
    def from_images(cls, images: list[Tensor], crop: int, scales: tuple[float, ...] = SCALES) -> CropSampler:
        levels = []
        for image in images:
            h, w = image.shape[1:]
            if min(h, w) < crop:
                raise UserError(f"an image of {w} x {h} pixels is smaller than the crop {crop}")
            x = to_model_range(image)
            levels.append([x if s == 1 else resize(x, round(h * s), round(w * s))
                           for s in scales if min(h, w) * s >= crop])
        return cls(levels, crop)

    def draw(self, batch: int, generator: torch.Generator) -> Tensor:
        """[batch, 3, crop, crop] in [-1, 1]."""
        out = torch.empty(batch, 3, self.crop, self.crop)
        for b in range(batch):
            pyramid = self.levels[_randint(len(self.levels), generator)]
            x = pyramid[_randint(len(pyramid), generator)]
            top, left = _randint(x.shape[1] - self.crop + 1, generator), _randint(x.shape[2] - self.crop + 1, generator)
            crop = x[:, top:top + self.crop, left:left + self.crop]
            out[b] = crop.flip(-1) if _randint(2, generator) else crop
        return out


def fixed_crops(images: list[Tensor], n: int, crop: int, seed: int) -> Tensor:
    """`n` crops at native resolution, from the images in turn (crop i from image i mod len), at positions fixed
    by `seed`: the held-out set."""
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, 3, crop, crop)
    for i in range(n):
        x = images[i % len(images)]
        top, left = _randint(x.shape[1] - crop + 1, g), _randint(x.shape[2] - crop + 1, g)
        out[i] = to_model_range(x[:, top:top + crop, left:left + crop])
    return out


def jitter_colours(x: Tensor, generator: torch.Generator, p: float, saturation: tuple[float, float]) -> Tensor:
    """Recolour a fraction p of the crops: a colour crop is turned by a hue angle uniform over the whole circle and
    its saturation scaled by a log-uniform factor in `saturation` (kornia.enhance); a greyscale crop, which a hue
    turn leaves grey, is painted through a gradient map between two random colours."""
    b = x.shape[0]
    chosen = torch.rand(b, generator=generator) < p
    hue = (torch.rand(b, generator=generator) * 2 - 1) * math.pi
    lo, hi = math.log(saturation[0]), math.log(saturation[1])
    sat = torch.exp(lo + (hi - lo) * torch.rand(b, generator=generator))
    dark, light = random_colours(b, generator), random_colours(b, generator)
    grey = (x.amax(1) - x.amin(1)).flatten(1).amax(1) < GREY_SPREAD
    x = x.clone()
    turn, paint = chosen & ~grey, chosen & grey
    if turn.any():
        u = kornia.enhance.adjust_hue((x[turn] + 1) / 2, hue[turn])
        x[turn] = kornia.enhance.adjust_saturation(u, sat[turn]).clamp(0, 1) * 2 - 1
    if paint.any():
        t = (x[paint].mean(1, keepdim=True) + 1) / 2
        x[paint] = torch.lerp(dark[paint][:, :, None, None], light[paint][:, :, None, None], t)
    return x


def random_colours(n: int, generator: torch.Generator) -> Tensor:
    """[n, 3] in [-1, 1]: hue uniform, saturation and value skewed towards 1 (sqrt of uniform), where photographs
    are thinnest."""
    h, s, v = torch.rand(3, n, generator=generator)
    hsv = torch.stack([h * 2 * math.pi, s.sqrt(), v.sqrt()], 1)[:, :, None, None]
    return kornia.color.hsv_to_rgb(hsv)[:, :, 0, 0] * 2 - 1


def colour_fields(n: int, side: int, generator: torch.Generator) -> Tensor:
    """[n, 3, side, side]: half flat colours, half smooth ones (a 2x2 to 4x4 grid of random colours, bilinearly
    upsampled), the kinds of areas skies, walls and grass make and photographs of textures lack."""
    out = random_colours(n, generator)[:, :, None, None].repeat(1, 1, side, side)
    for i in range(n):
        if _randint(2, generator):
            k = 2 + _randint(3, generator)
            grid = random_colours(k * k, generator).T.reshape(1, 3, k, k)
            out[i] = F.interpolate(grid, size=(side, side), mode="bilinear", align_corners=True)[0]
    return out


def mix_colour_fields(x: Tensor, generator: torch.Generator, p: float) -> Tensor:
    """A fraction p of the crops replaced by colour_fields."""
    chosen = torch.rand(x.shape[0], generator=generator) < p
    if not chosen.any():
        return x
    x = x.clone()
    x[chosen] = colour_fields(int(chosen.sum()), x.shape[-1], generator)
    return x


def _randint(n: int, generator: torch.Generator) -> int:
    return int(torch.randint(n, (), generator=generator))
