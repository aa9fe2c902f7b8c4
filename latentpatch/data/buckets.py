"""Aspect-ratio buckets: a few image shapes of about one area, so images of any shape train near their own.

The sizes are built as SDXL's and kohya-ss/sd-scripts' lists are: for each short side s (a multiple of the
step), the longest multiple of the step on the other side that keeps s x long within R x R. An image goes to
the bucket whose aspect ratio is nearest its own in log scale, which is the bucket that keeps the most of it
once it is resized to cover the bucket and the remainder centre-cropped (both are |log(a/b)| in disguise).
Ratios are compared as exact fractions, so a tie is a tie and breaks the same way on every machine.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Sequence

from latentpatch.errors import UserError

Size = tuple[int, int]  # (H, W) in pixels
# The bucket defaults, in one place (encode, fine-tuning and the commands read them): buckets at most 2:1, as SDXL's
# list and sd-scripts' default stop there, and sides in steps of two latent pixels, one DiT patch of 2.
MAX_ASPECT = 2.0
STEP_LATENTS = 2


def default_bucket_step(factor: int, multiple: int = 1) -> int:
    """The bucket sides' step in pixels when none is given: STEP_LATENTS latent pixels of an autoencoder of `factor`,
    or the network's `multiple` (the side its inputs divide into: a UNet's downsampling) where it is coarser."""
    return math.lcm(STEP_LATENTS, int(multiple)) * int(factor)


def aspect(size: Sequence[int]) -> Fraction:
    """H/W as an exact fraction: the key buckets are ordered by (tallest first)."""
    return Fraction(int(size[0]), int(size[1]))


def bucket_sizes(resolution: int, step: int, max_aspect: float = MAX_ASPECT) -> list[Size]:
    """Bucket sizes (H, W) of area <= resolution**2, both sides multiples of `step`, long/short <= max_aspect;
    both orientations, sorted by H/W descending (tallest portrait first, widest landscape last)."""
    if resolution < 1 or step < 1 or not 1 <= max_aspect < math.inf:
        raise UserError(f"buckets need resolution >= 1, step >= 1 and max aspect >= 1; got resolution "
                        f"{resolution}, step {step}, max aspect {max_aspect}")
    area = resolution * resolution
    sizes: set[Size] = set()
    for short in range(step, resolution + 1, step):  # short * short <= R^2
        long = area // short // step * step
        if long >= short and long <= max_aspect * short:
            sizes |= {(long, short), (short, long)}
    return sorted(sizes, key=aspect, reverse=True)


def check_bucket_options(resolution: int, step: int, factor: int) -> None:
    """Bucket sides must be whole latents (step a multiple of the factor), and the square R x R a bucket."""
    if step % factor:
        fix = factor * max(1, round(step / factor))
        raise UserError(f"--bucket-step {step} is not a multiple of the autoencoder's factor {factor}; use a "
                        f"multiple of {factor}, e.g. {fix}")
    if resolution % step:
        lower = max(step, resolution // step * step)
        raise UserError(f"--resolution {resolution} is not a multiple of --bucket-step {step}; use e.g. {lower} "
                        f"or {lower + step}")


def _kept(height: int, width: int, bucket: Sequence[int]) -> Fraction:
    r = aspect((height, width)) / aspect(bucket)
    return min(r, 1 / r)


def kept_share(height: int, width: int, bucket: Sequence[int]) -> float:
    """Share of the image's pixels that reach `bucket` when it is resized to cover the bucket (aspect kept) and
    the remainder centre-cropped: min(a/b, b/a), a and b the H/W of image and bucket."""
    return float(_kept(height, width, bucket))


def nearest_bucket(height: int, width: int, buckets: Sequence[Sequence[int]]) -> int:
    """Index of the bucket whose log aspect ratio is nearest log(H/W); a tie goes to the larger area, then
    the first."""
    if not buckets:
        raise ValueError("nearest_bucket needs at least one bucket")
    return max(range(len(buckets)),
               key=lambda i: (_kept(height, width, buckets[i]), buckets[i][0] * buckets[i][1], -i))
