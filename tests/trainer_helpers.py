"""Small real data sets for the trainer's tests: crops of scikit-image's sample photos in a latent store.

The "pixel" autoencoder is the identity, so a store of [3, S, S] images in [-1, 1] is a real latent store
(sigma_data = 0.5 fits pixels) and needs no network or download.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field", "retina",
          "camera", "brick", "grass")


def photo_crops(n: int, size: int, seed: int = 0, scale: int = 4) -> torch.Tensor:
    """n images [n, 3, size, size] in [-1, 1]: random size*scale crops of the photos, downsampled by scale."""
    import skimage.data

    rng = np.random.default_rng(seed)
    photos = []
    for name in PHOTOS:
        im = getattr(skimage.data, name)()
        im = np.repeat(im[..., None], 3, axis=2) if im.ndim == 2 else im[..., :3]
        photos.append(torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1).float() / 127.5 - 1)
    out = []
    side = size * scale
    for i in range(n):
        p = photos[i % len(photos)]
        top = int(rng.integers(0, p.shape[1] - side + 1))
        left = int(rng.integers(0, p.shape[2] - side + 1))
        crop = p[:, top : top + side, left : left + side][None]
        out.append(F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0])
    return torch.stack(out).clamp(-1, 1)


def make_store(root: Path, images: torch.Tensor, labels: list[int] | None = None, shard_size: int = 64,
               std: torch.Tensor | None = None, order: list[int] | None = None,
               autoencoder: dict | None = None) -> Path:
    """Write `images` (pixel-autoencoder latents; posterior `std` beside them if given) as a latent store at
    `root`. Image i is file img{i:04d}.png whatever its place: `order` lists the images in the store's order."""
    from latentpatch.autoencoders import PixelAutoencoder
    from latentpatch.data.manifest import Item, Manifest
    from latentpatch.data.store import StoreWriter

    n, c, h, w = images.shape
    order = list(range(n)) if order is None else list(order)
    manifest = Manifest(autoencoder=autoencoder or PixelAutoencoder().info.to_dict(), resolution=[h, w],
                        latent_shape=[c, h, w], dtype="float32", stores_std=std is not None)
    writer = StoreWriter(root, manifest, shard_size=shard_size, background=False)
    items = []
    for i in order:
        item = Item(file=f"img{i:04d}.png", sha256=f"{i:064x}", caption=None, flip=False, shard=0, row=0)
        if labels is not None:
            item.label = labels[i]
        items.append(item)
    tensors = {"mean": images[order].float()}
    if std is not None:
        tensors["std"] = std[order].float()
    writer.add(tensors, items)
    writer.close()
    return root


def tiny_overrides(**extra) -> list[str]:
    """key=value overrides on top of the tiny preset that keep a test run to seconds. Held-out evaluation is
    off unless a test asks for it: these stores are small, where a run would otherwise hold out a share."""
    base = {"train.log_every": 5, "train.ckpt_every": 10, "optim.warmup_steps": 10, "heldout.share": 0}
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def assert_same_weights(a: Path, b: Path, atol: float = 0.0) -> None:
    """The model and EMA weights of checkpoint folders `a` and `b` hold the same tensors: bit for bit (atol 0),
    or within `atol` (two processes sum gradients in another order than one)."""
    from safetensors.torch import load_file

    for name in ("model.safetensors", "ema.safetensors"):
        x, y = load_file(Path(a) / name), load_file(Path(b) / name)
        assert x.keys() == y.keys(), name
        for key in x:
            if atol == 0:
                assert torch.equal(x[key], y[key]), f"{name}:{key}"
            else:
                torch.testing.assert_close(y[key], x[key], rtol=0, atol=atol, msg=f"{name}:{key}")


def training_rows(path, spec=None, text=None, held=None):
    """The TrainingRows a run on the store at `path` trains from (conditioning by `spec`, none by default)."""
    from latentpatch.conditioning import ConditioningSpec
    from latentpatch.data.store import LatentStore
    from latentpatch.training.batches import conditioning_rows
    from latentpatch.training.rows import TrainingRows

    store = LatentStore(path)
    return TrainingRows.from_store(store, conditioning_rows(store, spec or ConditioningSpec(), text), held)


def assert_adapters_only(checkpoint: Path, stock: dict[str, torch.Tensor], prefix: str) -> None:
    """A LoRA fine-tune's checkpoint holds adapters and, under them, the stock network's weights unchanged
    (`stock`: the diffusers model's state dict; `prefix`: where the wrapper keeps it, e.g. "net.unet.")."""
    from safetensors.torch import load_file

    trained = load_file(Path(checkpoint) / "model.safetensors")
    frozen = {k.replace(".base_layer.", ".").removeprefix(prefix): v for k, v in trained.items() if ".lora_" not in k}
    assert any(".lora_" in k for k in trained) and frozen.keys() == stock.keys()
    assert all(torch.equal(frozen[k], stock[k]) for k in stock)  # the base stays stock: adapters alone trained


def assert_within_one_level(a: torch.Tensor, b: torch.Tensor, share: float = 0.01) -> None:
    """Two batches of 8-bit images ([0, 1] tensors) that differ by float rounding only: no pixel by more than one
    level, and at most `share` of them by that."""
    diff = (a - b).abs()
    assert float(diff.max()) <= 1 / 255 + 1e-6, float(diff.max())
    assert float((diff > 1e-6).float().mean()) <= share
