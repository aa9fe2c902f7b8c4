"""latentpatch: Patch Diffusion (Wang et al., 2023) in the latent space of a pretrained VAE.

The Python API follows the pipeline: ``encode`` an image folder into a latent store, ``train`` a
patch-wise EDM denoiser on it, ``sample`` full-size images from the run (``load_run`` gives its denoiser),
``evaluate_run`` judges it; ``finetune`` continues a run or a pretrained diffusers model on your own
(captioned) images; ``export`` writes a run as a diffusers pipeline folder. Heavy modules load lazily.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_API = {
    "encode": "latentpatch.encoding.encode",
    "train": "latentpatch.training.trainer",
    "sample": "latentpatch.sampling.generate",
    "finetune": "latentpatch.finetuning.finetune",
    "export": "latentpatch.exporting.exporter",
    "load_config": "latentpatch.config",
    "load_run": "latentpatch.runs",
    "evaluate_run": "latentpatch.metrics.evaluate",
    "load_autoencoder": "latentpatch.autoencoders",
    "LatentStore": "latentpatch.data.store",
    "UserError": "latentpatch.errors",
}

__all__ = sorted(_API)


def __getattr__(name: str) -> Any:
    if name in _API:
        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'latentpatch' has no attribute {name!r}")
