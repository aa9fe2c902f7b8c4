"""Encode with captions: how many rows the text tower runs and the process CPU time of `lp.encode` on the demo's
256 captioned images (4 distinct captions) with the demo's text encoder (ViT-B-32, random weights), one thread.

    OMP_NUM_THREADS=1 python -m benchmarks.throughput.encode_text --out /tmp/encode-text --repeats 3

Run it on two commits to compare them (docs/benchmarks.md: before and after captions were embedded once each).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

from latentpatch.demo.images import make_demo_images
from latentpatch.encoding.encode import encode
from latentpatch.text.open_clip_encoder import TextEncoder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)
    images = args.out / "images"
    if not images.is_dir():
        make_demo_images(images, 64, 64, 0)
    rows: list[int] = []
    forward = TextEncoder._forward

    def counted(self, ids):
        rows.append(len(ids))
        return forward(self, ids)

    TextEncoder._forward = counted  # every encoder's tower call goes through _forward
    for rep in range(args.repeats):
        shutil.rmtree(args.out / "latents", ignore_errors=True)
        rows.clear()
        wall, cpu = time.perf_counter(), time.process_time()
        encode(images, args.out / "latents", "builtin", 64, device="cpu", text_encoder="ViT-B-32", progress=False)
        print(f"run {rep}: process CPU {time.process_time() - cpu:.1f} s, wall {time.perf_counter() - wall:.1f} s; "
              f"text tower rows {sum(rows)} in {len(rows)} calls", flush=True)


if __name__ == "__main__":
    main()
