"""The shape a job samples at: a pixel size (`--size`) -> the latent shape, checked once against the run.

A size is (H, W) in the Python API (torch's order) and WxH on the command line (image tools' order); the
messages spell both. Any shape the network can take is allowed, since it sees the coordinate grid of that
shape (Patch Diffusion, Sec. 3.3); one it never trained at full size gets a Notice, because patch training
teaches positions, not the global layout of an unseen aspect ratio.
"""

from __future__ import annotations

import math
import re
import warnings
from typing import TYPE_CHECKING, Any, Sequence

from latentpatch.data.buckets import nearest_bucket
from latentpatch.denoiser import size_multiple
from latentpatch.distributed import is_main_process
from latentpatch.errors import Notice, UserError

if TYPE_CHECKING:
    from latentpatch.runs import LoadedRun

Size = tuple[int, int]  # (H, W)

_SIZE_TEXT = re.compile(r"\s*(-?\d+)\s*(?:[xX]\s*(-?\d+)\s*)?")


def parse_size(text: str) -> Size:
    """`--size WxH` (width first, as image tools write it) or `--size N` (N x N) -> (H, W)."""
    match = _SIZE_TEXT.fullmatch(text)
    if match is None:
        raise UserError(f"--size must be WxH in pixels (width first, e.g. 64x32) or N for a square, got {text!r}")
    width = int(match[1])
    return (width if match[2] is None else int(match[2]), width)


def wxh(size: Sequence[int]) -> str:
    """(H, W) as the command line writes it: WxH."""
    return f"{int(size[1])}x{int(size[0])}"


def trained_sizes(info: dict[str, Any]) -> list[Size]:
    """Latent (h, w) a run trained at full size: run.json's `buckets`, or its one `latent_shape`."""
    buckets = info.get("buckets")
    if buckets:
        return [(int(h), int(w)) for h, w in buckets]
    return [(int(info["latent_shape"][1]), int(info["latent_shape"][2]))]


def own_size(loaded: LoadedRun, size: Size | None) -> Size | None:
    """None when `size` is the run's own training shape in pixels (or None): one job and one folder for the
    run's shape, asked for or not; otherwise `size` unchanged (checked by `sample_shape`)."""
    if size is None:
        return None
    factor = int(loaded.info["autoencoder"]["factor"])
    _, h0, w0 = (int(s) for s in loaded.info["latent_shape"])
    return None if tuple(int(s) for s in size) == (h0 * factor, w0 * factor) else size


# The sampler keeps a batch's latents in float64 (EDM's integration precision) several times over: x, the denoised
# estimate, the derivative and the next x (Heun). Their bytes are a floor under what sampling a batch needs.
SAMPLER_BUFFERS = 4


def check_fits(shape: Sequence[int], batch: int, size: Size, device: Any) -> None:
    """Refuse, before anything is written, a size whose sampler state alone cannot fit in `device`'s free memory
    (a lower bound: the network's activations come on top), in one line."""
    from latentpatch.device import free_memory

    need = SAMPLER_BUFFERS * 8 * batch * math.prod(int(s) for s in shape)
    free = free_memory(device)
    if need > free:
        raise UserError(f"--size {wxh(size)} (latent {shape[1]}x{shape[2]}) cannot be sampled on {device}: a batch of "
                        f"{batch} needs at least {need / 2**30:.1f} GiB for the sampler's latents alone, and "
                        f"{free / 2**30:.1f} GiB are free; choose a smaller --size or --batch-size")


def sample_shape(loaded: LoadedRun, size: Size | None, batch: int = 1) -> tuple[int, int, int]:
    """The latent shape (C, H/f, W/f) of images of pixel `size` (None: the run's latent_shape).

    UserError unless each side is a positive multiple of f (the autoencoder's factor) x the network's size
    multiple and a `batch` of it can fit (check_fits); a Notice naming the nearest trained size when the run
    never trained that shape at full size.
    """
    c, h0, w0 = (int(s) for s in loaded.info["latent_shape"])
    if size is None:
        return (c, h0, w0)
    factor = int(loaded.info["autoencoder"]["factor"])
    net = size_multiple(loaded.precond.net)
    step = factor * net
    if any(s < 1 or s % step for s in size):
        near = tuple(max(step, round(abs(s) / step) * step) for s in size)
        raise UserError(
            f"--size {wxh(size)} (W x H; size={tuple(size)} in Python, H first) does not fit this run: each side "
            f"must be a positive multiple of {step} pixels (the autoencoder's factor {factor} x the network's size "
            f"multiple {net}); a valid size near it is --size {wxh(near)} (size={near})"
        )
    latent = (size[0] // factor, size[1] // factor)
    check_fits((c, *latent), batch, size, loaded.device)
    trained = trained_sizes(loaded.info)
    if latent not in trained and is_main_process():  # one notice for a torchrun job, not one per rank
        th, tw = trained[nearest_bucket(*latent, trained)]
        warnings.warn(
            f"--size {wxh(size)}: this run never trained at that shape at full size; the nearest size it trained "
            f"at is {wxh((th * factor, tw * factor))} (W x H). Sampling at {wxh(size)} anyway",
            Notice, stacklevel=1,
        )
    return (c, *latent)
