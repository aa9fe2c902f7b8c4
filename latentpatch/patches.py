"""Patch sampler: the patch-size schedule, random crops, and the coordinate channels.

One coordinate function serves training crops and full-size sampling, so a crop always carries
exactly its slice of the full grid (Wang et al. 2023, Sec. 3: pixel-level coordinate channels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from latentpatch.errors import UserError
from latentpatch.seeding import make_generator

COORDINATE_SCALES = ("per-axis", "longer-side")  # how a non-square image's grid is normalised (crop_coordinates)


def _axis(full: int | torch.Tensor, start: torch.Tensor, length: int, dtype: torch.dtype,
          span: int | torch.Tensor | None = None) -> torch.Tensor:
    """Coordinates of indices start..start+length-1 along one axis of side R (an int, or one per sample):
    2k/(R-1) - 1, spanning [-1, 1] (span None); with `span` S (the longer side), (2k - (R-1)) / (S-1), centred
    and spanning [-(R-1)/(S-1), (R-1)/(S-1)], so a shorter axis spans less than a longer one."""
    k = start.to(torch.float64)[..., None] + torch.arange(length, device=start.device, dtype=torch.float64)
    if span is None and isinstance(full, int):  # the square-store path, unchanged bit for bit
        return (2.0 * k / max(full - 1, 1) - 1.0).to(dtype)
    full_t = torch.as_tensor(full, dtype=torch.float64, device=start.device)
    span_t = full_t if span is None else torch.as_tensor(span, dtype=torch.float64, device=start.device)
    full_t = full_t[..., None] if full_t.ndim else full_t
    span_t = span_t[..., None] if span_t.ndim else span_t
    if span is None:
        return (2.0 * k / (full_t - 1).clamp(min=1) - 1.0).to(dtype)
    return ((2.0 * k - (full_t - 1)) / (span_t - 1).clamp(min=1)).to(dtype)


def crop_coordinates(
    tops: torch.Tensor, lefts: torch.Tensor, ph: int, pw: int, full_h: int | torch.Tensor,
    full_w: int | torch.Tensor, dtype: torch.dtype = torch.float32, scale: str = "per-axis",
) -> torch.Tensor:
    """[B, 2, ph, pw] coordinates of crops at (tops, lefts); channel 0 is x (width), 1 is y (height).

    `full_h`, `full_w`: the sides of the image each crop is cut from (ints, or one per sample when the images
    differ in shape). `scale` "per-axis": each axis of the image spans [-1, 1]; "longer-side": both axes are
    scaled by the longer side, so the shorter one spans less and the grid carries the image's aspect ratio
    (the two agree on square images, bit for bit)."""
    span = None
    if scale == "longer-side":
        if isinstance(full_h, int) and isinstance(full_w, int):
            span = None if full_h == full_w else max(full_h, full_w)
        else:
            span = torch.maximum(torch.as_tensor(full_h), torch.as_tensor(full_w))
    elif scale != "per-axis":
        raise ValueError(f"unknown coordinate scale {scale!r}; one of {COORDINATE_SCALES}")
    x = _axis(full_w, lefts, pw, dtype, span)  # [B, pw]
    y = _axis(full_h, tops, ph, dtype, span)  # [B, ph]
    b = x.shape[0]
    return torch.stack([x[:, None, :].expand(b, ph, pw), y[:, :, None].expand(b, ph, pw)], dim=1)


def coordinate_grid(
    full_h: int, full_w: int, top: int = 0, left: int = 0, height: int | None = None,
    width: int | None = None, *, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32,
    scale: str = "per-axis",
) -> torch.Tensor:
    """[2, h, w] coordinates of one window of the full grid (the whole grid by default)."""
    height = full_h - top if height is None else height
    width = full_w - left if width is None else width
    t = torch.tensor([top], device=device)
    l_ = torch.tensor([left], device=device)
    return crop_coordinates(t, l_, height, width, full_h, full_w, dtype, scale)[0]


def full_coordinates(
    batch: int, full_h: int, full_w: int, device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32, scale: str = "per-axis",
) -> torch.Tensor:
    """[B, 2, H, W]: the full grid, what sampling and full-size training steps see."""
    return coordinate_grid(full_h, full_w, device=device, dtype=dtype, scale=scale).expand(batch, 2, full_h, full_w)


def crop_offsets(
    batch: int, h: int, w: int, ph: int, pw: int, generator: torch.Generator | None = None, multiple: int = 1,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tops, lefts) [batch] of uniformly placed ph x pw crops of an h x w latent, multiples of `multiple`.

    With the network's token size (the DiT patch size) a crop's tokens sit exactly where full-size sampling has
    them, so it trains on the token grid sampling uses.
    """
    if ph > h or pw > w:
        raise UserError(f"patch {ph}x{pw} is larger than the latent {h}x{w}")
    gen_dev = generator.device if generator is not None else device
    tops = torch.randint(0, (h - ph) // multiple + 1, (batch,), generator=generator, device=gen_dev) * multiple
    lefts = torch.randint(0, (w - pw) // multiple + 1, (batch,), generator=generator, device=gen_dev) * multiple
    return tops, lefts


def crop_offsets_within(
    heights: torch.Tensor, widths: torch.Tensor, ph: int, pw: int, generator: torch.Generator | None = None,
    multiple: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(tops, lefts) of uniformly placed ph x pw crops, one per sample, each within its own heights[i] x widths[i]
    latent (a batch of images of different shapes: aspect buckets), multiples of `multiple`. Latents of one shape
    take exactly crop_offsets' draws, so a single-shape store's batches are what they always were."""
    if bool((heights < ph).any() or (widths < pw).any()):
        i = int(((heights < ph) | (widths < pw)).nonzero()[0])
        raise UserError(f"patch {ph}x{pw} is larger than the latent {int(heights[i])}x{int(widths[i])}")
    if bool((heights == heights[0]).all() and (widths == widths[0]).all()):  # one shape: crop_offsets' draws
        return crop_offsets(len(heights), int(heights[0]), int(widths[0]), ph, pw, generator, multiple,
                            device=heights.device)
    dev = generator.device if generator is not None else heights.device
    # randint takes one bound for all; a uniform in [0, 1) scaled by each sample's count of positions takes many
    n_top = ((heights - ph) // multiple + 1).to(dev, torch.float64)
    n_left = ((widths - pw) // multiple + 1).to(dev, torch.float64)
    tops = (torch.rand(len(heights), generator=generator, device=dev, dtype=torch.float64) * n_top).long()
    lefts = (torch.rand(len(widths), generator=generator, device=dev, dtype=torch.float64) * n_left).long()
    # the product rounds up to the count itself for the largest draws of a huge count: keep it a position
    tops, lefts = torch.minimum(tops, n_top.long() - 1), torch.minimum(lefts, n_left.long() - 1)
    return tops * multiple, lefts * multiple


def gather_crops(
    latents: torch.Tensor, tops: torch.Tensor, lefts: torch.Tensor, ph: int, pw: int, scale: str = "per-axis",
) -> tuple[torch.Tensor, torch.Tensor]:
    """The crops at (tops, lefts) of each sample (a vectorised gather) and their coordinate channels."""
    b, c, h, w = latents.shape
    dev = latents.device
    tops, lefts = tops.to(dev), lefts.to(dev)
    rows = tops[:, None] + torch.arange(ph, device=dev)  # [B, ph]
    cols = lefts[:, None] + torch.arange(pw, device=dev)  # [B, pw]
    bidx = torch.arange(b, device=dev)[:, None, None]
    crops = latents.permute(0, 2, 3, 1)[bidx, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
    coords = crop_coordinates(tops, lefts, ph, pw, h, w, dtype=latents.dtype, scale=scale)
    return crops.contiguous(), coords.contiguous()


def random_crops(
    latents: torch.Tensor, ph: int, pw: int, generator: torch.Generator | None = None, multiple: int = 1,
    scale: str = "per-axis",
) -> tuple[torch.Tensor, torch.Tensor]:
    """A uniformly placed crop per sample (offsets multiples of `multiple`) and its coordinate channels."""
    b, _, h, w = latents.shape
    tops, lefts = crop_offsets(b, h, w, ph, pw, generator, multiple, device=latents.device)
    return gather_crops(latents, tops, lefts, ph, pw, scale)


@dataclass
class PatchConfig:
    """Patch schedule (Wang et al. 2023): the full size gets real_p; smaller sides are fractions of it."""

    real_p: float = 0.5
    sizes: list[float] | None = None  # None (not given): [0.5], or [] when real_p=1 (full size only)
    size_weights: list[float] | None = None  # one relative weight per entry of sizes (None: equal)
    batch_growth: float = 2.0
    # Crop offsets on the network's token grid (DiT patch size, UNet downsampling). Off by default: crops at any
    # offset are more distinct crops, which measured better on small data (docs/benchmarks.md, speed to quality).
    # A base whose positions exist only on its token grid (a pretrained DiT's table) turns it on.
    aligned: bool = False
    # A non-square image's coordinate grid: "longer-side" (both axes scaled by the longer side, so the grid
    # carries the aspect ratio; measured ~1% lower held-out loss on aspect buckets, docs/benchmarks.md) or
    # "per-axis" (each axis spans [-1, 1]; what runs saved without this key used). The same on square images.
    coordinate_scale: str = "longer-side"
    # Zoomed-out views (issue 21): a share zoom_p of the steps, taken from real_p, trains on whole images at a
    # lower resolution, the latents of a second store of the same images encoded at that resolution.
    zoom_latents: str | None = None
    zoom_p: float = 0.0

    def __post_init__(self) -> None:
        # Only fills what was not given, so `check` can refuse given sides beside real_p=1.
        if self.sizes is None:
            self.sizes = [] if self.real_p == 1.0 else [0.5]

    def check(self) -> None:
        if not 0.0 <= self.real_p <= 1.0:
            raise UserError(f"patches.real_p must be in [0, 1], got {self.real_p}")
        if self.real_p == 1.0 and self.sizes:
            raise UserError(f"patches.real_p=1 trains on full-size latents only, so patches.sizes {self.sizes} would "
                            "never be used; set patches.sizes=[] too (as the full-size preset does), or real_p < 1")
        if self.real_p < 1.0 and not self.sizes:
            raise UserError(f"patches.real_p={self.real_p} leaves {1 - self.real_p:g} of the steps to patches, but "
                            "patches.sizes is empty; give the patch sides, e.g. patches.sizes=[0.5]")
        if any(not 0.0 < s < 1.0 for s in self.sizes):
            raise UserError(f"patches.sizes are fractions of the latent side in (0, 1), got {self.sizes}")
        if self.size_weights is not None:
            if len(self.size_weights) != len(self.sizes):
                raise UserError(f"patches.size_weights has {len(self.size_weights)} entries for the "
                                f"{len(self.sizes)} of patches.sizes {self.sizes}; give one weight per size")
            if any(w < 0 for w in self.size_weights) or sum(self.size_weights) <= 0:
                raise UserError(f"patches.size_weights must be >= 0 with a positive sum, got {self.size_weights}")
        if self.coordinate_scale not in COORDINATE_SCALES:
            raise UserError(f"patches.coordinate_scale must be one of {COORDINATE_SCALES}, got {self.coordinate_scale!r}")
        if self.batch_growth <= 0:
            raise UserError(f"patches.batch_growth must be > 0, got {self.batch_growth}")
        if not 0.0 <= self.zoom_p <= self.real_p:
            raise UserError(f"patches.zoom_p is a share of the full-size steps, in [0, patches.real_p={self.real_p}], "
                            f"got {self.zoom_p}")
        if (self.zoom_p > 0) != bool(self.zoom_latents):
            raise UserError(f"patches.zoom_p={self.zoom_p} and patches.zoom_latents={self.zoom_latents!r} go together: "
                            "zoomed-out steps need the store of the downscaled images, and that store needs zoom_p > 0")


@dataclass(frozen=True)
class PatchStage:
    """One entry of the schedule: patch side (latent pixels), its probability and batch size."""

    height: int
    width: int
    prob: float
    batch_size: int
    zoom: bool = False  # a zoomed-out view: the whole image from the zoom store, at its (smaller) latent shape


class PatchSchedule:
    """Draws one patch size per step (the same on every rank: the draw depends on seed and step only).

    Non-full sizes are fractions of the latent side with relative weights; the full size gets `real_p`
    (the paper's real_p). Batch grows by `batch_growth` each time the side halves (the paper doubles it).
    `zoom_shape` (h, w): the zoom store's latent, a stage of probability zoom_p (taken from real_p) whose batch
    grows like a crop's of that side. The config was checked at load (PatchConfig.check); what depends on the
    latents is checked here.
    """

    def __init__(self, cfg: PatchConfig, latent_h: int, latent_w: int, batch_size: int, multiple_of: int = 1,
                 seed: int = 0, zoom_shape: tuple[int, int] | None = None) -> None:
        sizes = [float(s) for s in cfg.sizes] if cfg.real_p < 1.0 else []
        weights = [float(x) for x in (cfg.size_weights or [1.0] * len(sizes))]
        stages = []
        for frac, wgt in zip(sizes, weights):
            ph, pw = round(latent_h * frac), round(latent_w * frac)
            mult = cfg.batch_growth ** math.log2(1.0 / frac)
            stages.append(PatchStage(ph, pw, (1.0 - cfg.real_p) * wgt / sum(weights),
                                     max(1, round(batch_size * mult))))
        if cfg.zoom_p > 0:
            stages.append(_zoom_stage(cfg, zoom_shape, latent_h, latent_w, batch_size, multiple_of))
        full_p = cfg.real_p - cfg.zoom_p
        if full_p > 0 or not stages:
            stages.append(PatchStage(latent_h, latent_w, full_p if stages else 1.0, batch_size))
        for s in stages:
            if s.height % multiple_of or s.width % multiple_of or s.height < multiple_of:
                raise UserError(
                    f"patch size {s.height}x{s.width} (of latent {latent_h}x{latent_w}) is not divisible by "
                    f"the network's patch size {multiple_of}; change patches.sizes or the resolution"
                )
        self.stages = sorted(stages, key=lambda s: s.height * s.width)
        self.seed = seed
        self._probs = torch.tensor([s.prob for s in self.stages], dtype=torch.float64)

    def draw(self, step: int) -> PatchStage:
        """The stage for optimisation step `step` (deterministic in seed and step, so resume is exact)."""
        g = make_generator("cpu", self.seed, step, "patch-size")
        return self.stages[int(torch.multinomial(self._probs, 1, generator=g))]


def _zoom_stage(cfg: PatchConfig, shape: tuple[int, int] | None, latent_h: int, latent_w: int, batch_size: int,
                multiple_of: int) -> PatchStage:
    """The zoomed-out stage: the zoom store's whole latent, its batch grown by batch_growth per halving of the side."""
    if shape is None:
        raise ValueError("patches.zoom_p > 0 needs the zoom store's latent shape (PatchSchedule zoom_shape)")
    h, w = shape
    if h % multiple_of or w % multiple_of or h < multiple_of:
        raise UserError(f"the zoomed-out latent {h}x{w} (patches.zoom_latents {cfg.zoom_latents}) is not divisible by "
                        f"the network's patch size {multiple_of}; encode the zoom store at a resolution whose latent "
                        f"side is a multiple of {multiple_of}")
    mult = cfg.batch_growth ** math.log2(latent_h / h)
    return PatchStage(h, w, cfg.zoom_p, max(1, round(batch_size * mult)), zoom=True)
