"""The run folder's contract between training and sampling: config.yaml, run.json, checkpoints/, load_run.

    config.yaml   the resolved RunConfig (every value a run was trained with)
    run.json      what sampling needs besides it: the autoencoder that decodes, the latent shape and
                  resolution, the conditioning spec (classes, text encoder); and how the run was held out
                  and evaluated (the held-out files, every, patience, the weighting's sd), which eval reads
    checkpoints/  safetensors weights (latentpatch.checkpoints)

A run can always be sampled, evaluated and fine-tuned from its folder alone.
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

import latentpatch
from latentpatch import checkpoints as ckpt
from latentpatch.conditioning import ConditioningSpec, spec_from_run
from latentpatch.errors import UserError

if TYPE_CHECKING:
    from latentpatch.config import RunConfig
    from latentpatch.data.store import LatentStore
    from latentpatch.text.open_clip_encoder import TextEncoder

RUN_FORMAT_VERSION = 1
CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"


def is_run_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_FILE).is_file() and (Path(path) / RUN_FILE).is_file()


def run_info(store: LatentStore, spec: ConditioningSpec, heldout: dict[str, Any] | None = None,
             zoom: LatentStore | None = None) -> dict[str, Any]:
    """run.json of a run trained on `store` with conditioning `spec`, held-out plan `heldout`
    (training.guard.HeldoutPlan.to_dict) and zoomed-out views from `zoom` (patches.zoom_latents). On aspect
    buckets: `buckets` (latent [h, w] of each, the shapes it trained at full size), `latent_shape` the most common
    bucket's, and the store's own (nominal) latent shape."""
    return {
        "format_version": RUN_FORMAT_VERSION,
        "latents": str(store.path.resolve()),
        "autoencoder": store.info.to_dict(),
        **trained_shapes(store),
        "resolution": list(store.resolution),
        "store": {**store_identity(store),
                  **({} if not store.bucketed else {"latent_shape": list(store.latent_shape)})},
        **({} if zoom is None else {"zoom_store": {"latents": str(zoom.path.resolve()), **store_identity(zoom)}}),
        "conditioning": spec.to_dict(),
        **({} if heldout is None else {"heldout": heldout}),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "latentpatch_version": latentpatch.__version__,
    }


def store_identity(store: LatentStore) -> dict[str, Any]:
    """What run.json records of a store's images, so a resume can tell that they changed and say how: the
    manifest's identity, its image count and, of a store with aspect buckets, the settings they were made with."""
    m = store.manifest
    buckets = {"bucket_step": m.bucket_step, "max_aspect": m.max_aspect} if m.bucketed else {}
    return {"identity": m.identity, "images": m.image_count, **buckets}


def trained_shapes(store: LatentStore) -> dict[str, Any]:
    """What run.json and every checkpoint record of the shapes a run on `store` trains: `latent_shape`, the default
    sampling shape (run_latent_shape), and `buckets`, latent [h, w] of each aspect bucket (None: one shape)."""
    buckets = None if not store.bucketed else [[h, w] for _, h, w in store.bucket_latent_shapes]
    return {"latent_shape": list(run_latent_shape(store)), "buckets": buckets}


def run_latent_shape(store: LatentStore) -> tuple[int, int, int]:
    """The latent shape a run on `store` samples by default (run.json's latent_shape): the store's, or on aspect
    buckets the most common bucket's."""
    if not store.bucketed:
        return store.latent_shape
    return store.bucket_latent_shapes[store.most_common_bucket]


def store_latent_shape(info: dict[str, Any]) -> list[int]:
    """The latent shape a store declares (LatentStore.latent_shape) when it holds latents like a run's: run.json's
    latent_shape, or for a run on aspect buckets the nominal square of the buckets' area, recorded beside it."""
    return (info.get("store") or {}).get("latent_shape") or info["latent_shape"]


def read_run_info(run_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(run_dir) / RUN_FILE
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise UserError(f"{run_dir} is not a latentpatch run folder: {RUN_FILE} is missing ({e.strerror})") from e
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON: {e}") from e


def check_format_version(info: dict[str, Any], run_dir: str | os.PathLike) -> None:
    """UserError for a run.json written by a newer latentpatch (a run format this one does not know)."""
    version = info.get("format_version", RUN_FORMAT_VERSION)
    if not isinstance(version, int) or version > RUN_FORMAT_VERSION:
        raise UserError(f"{Path(run_dir) / RUN_FILE} has run format_version {version!r}; latentpatch "
                        f"{latentpatch.__version__} reads format {RUN_FORMAT_VERSION}: upgrade latentpatch")


@dataclass
class LoadedRun:
    """A run's denoiser, ready to sample: its config, run.json, conditioning spec and a verified checkpoint."""

    cfg: RunConfig
    info: dict[str, Any]  # run.json
    spec: ConditioningSpec
    precond: nn.Module  # the preconditioned denoiser, eval mode, on its device
    run_dir: Path
    checkpoint: Path
    weights: str  # "ema" or "raw"
    checkpoint_id: str  # first 16 hex of the weights file's sha256
    step: int
    _text_encoder: TextEncoder | None = None

    @property
    def device(self) -> torch.device:
        return next(self.precond.parameters()).device

    def text_encoder(self) -> TextEncoder | None:
        """The encoder prompts must go through (loaded once, on the run's device); None without text."""
        if not self.spec.text:
            return None
        if self._text_encoder is None:
            from latentpatch.text.loader import load_text_encoder_from_record

            self._text_encoder = load_text_encoder_from_record(self.spec.text_encoder, device=self.device)
        return self._text_encoder


def load_run(
    run_dir: str | os.PathLike, weights: str = "ema", checkpoint: str | int | None = None,
    device: str | torch.device = "cpu",
) -> LoadedRun:
    """The denoiser of a run folder: config, run.json and the `weights` of a verified checkpoint (by default
    BEST, the best held-out one, when the run kept one, else the latest), built on `device`."""
    from latentpatch.config import load_saved_config
    from latentpatch.denoiser import build_precond

    run_dir = Path(run_dir)
    if weights not in ckpt.WEIGHT_FILES:
        raise UserError(f"weights must be 'ema' or 'raw', got {weights!r}")
    for needed in (CONFIG_FILE, RUN_FILE):
        if not (run_dir / needed).is_file():
            raise UserError(f"{run_dir} is not a latentpatch run folder: {needed} is missing")
    cfg = load_saved_config(run_dir / CONFIG_FILE)
    info = read_run_info(run_dir)
    found = ckpt.resolve_checkpoint(run_dir, checkpoint)
    state = ckpt.read_state(found)
    if weights == "raw" and "posthoc" in state:
        raise UserError(f"{found} is a post-hoc EMA reconstruction (`latentpatch ema`): it holds averaged weights "
                        "only; load it with weights 'ema' (--weights ema)")
    path = ckpt.verified_file(found, ckpt.WEIGHT_FILES[weights], state)
    precond = build_precond(cfg, int(info["latent_shape"][0]), device=device)
    ckpt.load_weights(precond, path)
    if cfg.model.lora_rank > 0:  # fold the adapters in: sampling then costs what the base model costs
        from latentpatch.models.lora import merge_lora

        merge_lora(precond)
    return LoadedRun(
        cfg=cfg, info=info, spec=spec_from_run(info, cfg), precond=precond.to(device).eval().requires_grad_(False),
        run_dir=run_dir, checkpoint=found, weights=weights,
        checkpoint_id=state["files"][ckpt.WEIGHT_FILES[weights]][:16], step=int(state["step"]),
    )
