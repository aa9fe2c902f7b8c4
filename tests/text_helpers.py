"""Offline text-conditioning test data: a tiny open_clip model config and captioned solid-colour images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": 0, "green": 1, "blue": 2}
TINY_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def write_clip_config(path: Path, **text_cfg) -> Path:
    """A CLIP config (text: 2 layers of width 32, context 77, open_clip's BPE vocabulary) with text_cfg changes."""
    cfg = json.loads(json.dumps(TINY_CLIP))
    cfg["text_cfg"].update(text_cfg)
    path.write_text(json.dumps(cfg))
    return path


def colour_folder(root: Path, n: int = 24, size: int = 8, seed: int = 0, captions: bool = True) -> Path:
    """n noisy solid-colour images, captioned by their dominant channel ("red", "green", "blue")."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    meta = []
    for i in range(n):
        name = list(COLOURS)[i % 3]
        rgb = rng.uniform(0.0, 0.3, size=3)
        rgb[COLOURS[name]] = rng.uniform(0.6, 1.0)
        pixels = np.clip(rgb + rng.normal(0, 0.05, size=(size, size, 3)), 0, 1)
        Image.fromarray((pixels * 255).astype(np.uint8)).save(root / f"{i:03d}.png")
        meta.append({"file_name": f"{i:03d}.png", "text": name})
    if captions:
        (root / "metadata.jsonl").write_text("".join(json.dumps(m) + "\n" for m in meta))
    return root
