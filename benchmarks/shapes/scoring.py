"""What each aspect-bucket arm learnt: held-out loss per bucket at each image's own shape, and a picture of
samples at three aspect ratios, a row per model and shape."""

from __future__ import annotations

from pathlib import Path

import latentpatch as lp

SHAPES = {"portrait 48x80": (80, 48), "square 64x64": (64, 64), "landscape 80x48": (48, 80)}  # name (W x H): (H, W)


def score_per_bucket(runs: dict[str, Path], heldout: Path) -> dict[str, dict]:
    """Each arm's best checkpoint (its EMA) scored on the bucketed held-out images, each at its own shape."""
    from latentpatch.metrics.denoising import run_denoising_loss
    from latentpatch.runs import load_run

    out = {}
    for arm, run in runs.items():
        loss = run_denoising_loss(load_run(run), heldout)
        out[arm] = {"mean": loss.mean, "per_bucket": {f"{b['latent'][1] * 4}x{b['latent'][0] * 4}": b["mean"]
                                                      for b in loss.per_bucket}}
    return out


def sample_picture(runs: dict[str, Path], path: Path, n: int) -> None:
    """A row per (model, shape): n samples at that shape, the same seeds in every row."""
    from PIL import Image, ImageDraw

    rows = []
    for arm, run in runs.items():
        for name, size in SHAPES.items():
            images = lp.sample(run, n=n, size=size, seed=0, device="cpu")
            rows.append((f"{arm}, {name}", images))
    pad, label_h = 4, 14
    width = max(sum(im.width + pad for im in ims) for _, ims in rows) + pad
    height = sum(label_h + ims[0].height + pad for _, ims in rows) + pad
    sheet = Image.new("RGB", (width, height), (255, 255, 255))
    draw, y = ImageDraw.Draw(sheet), pad
    for label, ims in rows:
        draw.text((pad, y), label, fill=(0, 0, 0))
        y += label_h
        x = pad
        for im in ims:
            sheet.paste(im, (x, y))
            x += im.width + pad
        y += ims[0].height + pad
    sheet.save(path)
