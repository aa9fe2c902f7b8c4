"""Files an export folder ships beside the weights, loaded by diffusers with `trust_remote_code=True`: the
pipeline (`pipeline_latentpatch.py`, at the folder's root), latentpatch's DiT as a diffusers model
(`latentpatch_dit.py`, in `transformer/`) and EDM's Heun scheduler (`scheduling_edm_heun.py`, in `scheduler/`).
They import torch, diffusers and transformers only, never latentpatch, and are copied byte for byte."""

from pathlib import Path

SHIPPED_DIR = Path(__file__).resolve().parent
PIPELINE_MODULE, PIPELINE_CLASS = "pipeline_latentpatch", "LatentPatchPipeline"
DIT_MODULE, DIT_CLASS = "latentpatch_dit", "LatentPatchDiT"
HEUN_MODULE, HEUN_CLASS = "scheduling_edm_heun", "EDMHeunScheduler"
