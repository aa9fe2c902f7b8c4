"""The same seeds through each arm: one row per arm (its name on the left), the first images of each prompt, from
the sample folders `benchmarks.caching.quality` wrote.

    python -m benchmarks.caching.figure caching-samples/demo --per-prompt 16 --take 2 --out docs/figures/caching-samples.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from PIL import Image, ImageDraw

LABEL_W = 120


def row(folder: Path, per_prompt: int, take: int) -> list[Image.Image]:
    images = json.loads((folder / "job.json").read_text())["images"]
    picks = [i for i in range(len(images)) if i % per_prompt < take]
    return [Image.open(folder / f"{i:08d}.png").convert("RGB") for i in picks]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("work", type=Path, help="the --work folder of benchmarks.caching.quality")
    p.add_argument("--arms", default=None, help="comma-separated arm names in row order (default: every seed-0 arm)")
    p.add_argument("--per-prompt", type=int, required=True, help="the --n the samples were made with")
    p.add_argument("--take", type=int, default=2, help="images per prompt shown")
    p.add_argument("--scale", type=int, default=1)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    names = args.arms.split(",") if args.arms else sorted(
        (f.name[: -len("-seed0")].replace("-", " ") for f in args.work.glob("*-seed0")),
        key=lambda n: (n != "uncached", n))
    rows = [row(args.work / f"{name.replace(' ', '-')}-seed0", args.per_prompt, args.take) for name in names]
    w, h = (s * args.scale for s in rows[0][0].size)
    pad = 2
    sheet = Image.new("RGB", (LABEL_W + len(rows[0]) * (w + pad), len(rows) * (h + pad)), "white")
    draw = ImageDraw.Draw(sheet)
    for r, (name, images) in enumerate(zip(names, rows)):
        draw.text((4, r * (h + pad) + h // 2 - 6), name, fill="black")
        for c, image in enumerate(images):
            sheet.paste(image.resize((w, h), Image.Resampling.NEAREST), (LABEL_W + c * (w + pad), r * (h + pad)))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"{args.out}: {len(rows)} arms x {len(rows[0])} images")


if __name__ == "__main__":
    main()
