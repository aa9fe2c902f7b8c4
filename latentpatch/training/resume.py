"""What a start in a run folder must agree with: the saved config (but for train.max_steps) and the latents, images
and zoom store the run started on. Pure functions of the folder's record and the request: nothing here writes.

A resume that would silently train a different configuration, or on latents from a different autoencoder or of
other images, is refused with what differs; a new run into a folder with checkpoints is refused.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from latentpatch.checkpoints import latest_checkpoint
from latentpatch.config import RunConfig, config_to_dict, differences, load_saved_config
from latentpatch.data.store import LatentStore
from latentpatch.errors import UserError
from latentpatch.runs import CONFIG_FILE, RUN_FILE, store_latent_shape
from latentpatch.training.guard import CHOSEN_KEYS

RESUMABLE_KEYS = ("train.max_steps",)  # may change between a run and its resume


@dataclass(frozen=True)
class SavedRun:
    """What a run folder held before this start: its config, run.json and newest checkpoint (any may be None)."""

    cfg: RunConfig | None
    info: dict[str, Any] | None
    checkpoint: Path | None

    @classmethod
    def read(cls, run_dir: Path) -> SavedRun:
        """The folder's record, read once (LATEST naming a lost checkpoint is told once, here)."""
        config = run_dir / CONFIG_FILE
        try:
            info = json.loads((run_dir / RUN_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            info = None  # killed before run.json was written: nothing to compare, it is written anew
        return cls(load_saved_config(config) if config.is_file() else None, info, latest_checkpoint(run_dir))


def config_differences(a: RunConfig, b: RunConfig, ignore: tuple[str, ...] = RESUMABLE_KEYS) -> list[str]:
    """Dotted keys whose values differ, as 'key: a -> b'."""
    return differences(config_to_dict(a), config_to_dict(b), ignore)


def chosen_config(request: RunConfig | None, saved: SavedRun, run_dir: Path, resume: bool,
                  max_steps: int | None) -> RunConfig:
    """The config to train with, with `max_steps` when given: the request for a new run; the saved one on a
    resume, which refuses a different request (but for train.max_steps). The request is already resolved against
    the store (training.resolve), as the saved config was."""
    if resume and saved.cfg is not None:
        cfg = saved.cfg
        if request is not None:
            diff = config_differences(cfg, _with_chosen(request, cfg))
            if diff:
                raise UserError(f"--resume: the config differs from the one run {run_dir} was started with "
                                f"({'; '.join(diff)}); resume without --config, or start a new --out")
            max_steps = request.train.max_steps if max_steps is None else max_steps
    elif saved.checkpoint is not None and resume:
        raise UserError(f"run folder {run_dir} has checkpoints but no {CONFIG_FILE}; it cannot be resumed")
    elif saved.checkpoint is not None:
        raise UserError(f"run folder {run_dir} already has checkpoints; pass --resume to continue it, or a new --out")
    elif request is None:
        raise UserError(f"{run_dir} holds no run to resume; pass --config to start a new one")
    else:
        cfg = request
    if max_steps is None:
        return cfg
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=int(max_steps))).check()


def _with_chosen(request: RunConfig, old: RunConfig) -> RunConfig:
    """The request with the keys it leaves to the run (null) taken from the run's saved config."""
    request = copy.deepcopy(request)
    for section, key in CHOSEN_KEYS:
        if getattr(getattr(request, section), key) is None:
            setattr(getattr(request, section), key, getattr(getattr(old, section), key))
    return request


def check_same_data(run_dir: Path, old: dict[str, Any] | None, store: LatentStore,
                    zoom: LatentStore | None) -> None:
    """A resume must be on latents of the same space and shape, of the same images, with the same zoom store."""
    if old is None:
        return
    shape = store_latent_shape(old) if old.get("latent_shape") else None
    store.require_latent_space(old.get("autoencoder") or {}, shape, f"--resume: run {run_dir} was trained on",
                               f"resume with the run's own store ({old.get('latents')})")
    _check_same_images(run_dir, old, store)
    _check_same_zoom(run_dir, old, zoom)


def _check_same_zoom(run_dir: Path, old: dict, zoom: LatentStore | None) -> None:
    """A resume reads zoomed-out views from the zoom store the run started with (patches.zoom_latents names the
    same path, the config check saw to that): one rewritten in place since is refused."""
    recorded = old.get("zoom_store") or {}
    if zoom is None or "identity" not in recorded or recorded["identity"] == zoom.manifest.identity:
        return
    raise UserError(f"--resume: patches.zoom_latents {zoom.path} holds other images ({zoom.manifest.image_count}) "
                    f"than when run {run_dir} started on it ({recorded.get('images')}); a resume continues on the "
                    f"zoomed-out latents it started with: restore that store, or start a new --out")


def _check_same_images(run_dir: Path, old: dict, store: LatentStore) -> None:
    """A resume continues on the images the run started with: a store of another identity is refused, naming
    what changed. A run written before identities were recorded has none to compare."""
    recorded = old.get("store") or {}
    if "identity" not in recorded or recorded["identity"] == store.manifest.identity:
        return
    then, now = recorded.get("images"), store.manifest.image_count
    fix = (f"a resume continues on the images the run started with; to train on these, fine-tune from the run: "
           f"latentpatch train --base {run_dir} --latents {store.path} --out NEW")
    same_folder = old.get("latents") == str(store.path.resolve())
    if same_folder and then is not None:
        change = (f"{now - then} images added" if now > then else f"{then - now} images removed" if now < then
                  else _same_count_change(old, store))
        raise UserError(f"--resume: store {store.path} has changed since run {run_dir} started on it ({change}: "
                        f"{then} then, {now} now); {fix}")
    held = f"{then} images" if then is not None else "other images"
    raise UserError(f"--resume: run {run_dir} was trained on store {old.get('latents')} ({held}), but store "
                    f"{store.path} holds other images ({now}); {fix}")


def _same_count_change(old: dict, store: LatentStore) -> str:
    """What changed in a store of as many images: its buckets (re-encoded with another --bucket-step or
    --max-aspect, named when run.json recorded them), else the images themselves."""
    from latentpatch.runs import trained_shapes

    recorded = old.get("store") or {}
    then_buckets, now_buckets = old.get("buckets"), trained_shapes(store)["buckets"]
    if then_buckets == now_buckets:
        return "as many images, but not the same ones"
    settings = [f"{key.replace('_', '-')} {recorded[key]} then, {getattr(store.manifest, key)} now"
                for key in ("bucket_step", "max_aspect") if key in recorded and recorded[key] != getattr(store.manifest, key)]
    named = f" (--{'; --'.join(settings)})" if settings else ""
    return (f"the same images re-encoded into other aspect buckets{named}: latent buckets {then_buckets} then, "
            f"{now_buckets} now")
