"""Starting or resuming a run in a folder: the config with what the store decides, and the saved config and
run.json, checked again on every resume.

A resume that would silently train a different configuration, or on latents from a different autoencoder,
is refused with the keys that differ.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

from latentpatch.checkpoints import CKPT_DIR, latest_checkpoint
from latentpatch.conditioning import ConditioningSpec, TextSource, derive_spec
from latentpatch.config import RunConfig, config_to_dict, differences, load_config, save_config
from latentpatch.data.store import LatentStore
from latentpatch.errors import UserError
from latentpatch.io import write_json_atomic
from latentpatch.metrics.denoising import store_sigma_data
from latentpatch.runs import CONFIG_FILE, RUN_FILE, run_info, store_latent_shape
from latentpatch.training.guard import CHOSEN_KEYS, HeldoutPlan
from latentpatch.training.logging import LOG_FILE
from latentpatch.training.posthoc_ema import POSTHOC_DIR

RESUMABLE_KEYS = ("train.max_steps",)  # may change between a run and its resume
LOCK_FILE = ".train.lock"


def config_differences(a: RunConfig, b: RunConfig, ignore: tuple[str, ...] = RESUMABLE_KEYS) -> list[str]:
    """Dotted keys whose values differ, as 'key: a -> b'."""
    return differences(config_to_dict(a), config_to_dict(b), ignore)


def _check_same_latents(run_dir: Path, store: LatentStore, zoom: LatentStore | None) -> None:
    try:
        old = json.loads((run_dir / RUN_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return  # killed before run.json was written: nothing to compare, it is rewritten below
    shape = store_latent_shape(old) if old.get("latent_shape") else None
    store.require_latent_space(old.get("autoencoder") or {}, shape,
                               f"--resume: run {run_dir} was trained on",
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
    """A resume continues on the images the run started with: a store of another identity is refused. A run
    written before identities were recorded has none to compare; record_run records it from now on."""
    recorded = old.get("store") or {}
    if "identity" not in recorded or recorded["identity"] == store.manifest.identity:
        return
    then, now = recorded.get("images"), store.manifest.image_count
    fix = (f"a resume continues on the images the run started with; to train on these, fine-tune from the run: "
           f"latentpatch train --base {run_dir} --latents {store.path} --out NEW")
    same_folder = old.get("latents") == str(store.path.resolve())
    if same_folder and then is not None:
        change = (f"{now - then} images added" if now > then else f"{then - now} images removed" if now < then
                  else "as many images, but not the same ones")
        raise UserError(f"--resume: store {store.path} has changed since run {run_dir} started on it ({change}: "
                        f"{then} then, {now} now); {fix}")
    held = f"{then} images" if then is not None else "other images"
    raise UserError(f"--resume: run {run_dir} was trained on store {old.get('latents')} ({held}), but store "
                    f"{store.path} holds other images ({now}); {fix}")


def saved_config(run_dir: Path, cfg: RunConfig | None, resume: bool) -> RunConfig:
    """The config to train with: the request for a new run; the saved one on a resume, which refuses a
    different request (but for train.max_steps). A new run into a folder with checkpoints is refused."""
    saved = run_dir / CONFIG_FILE
    has_ckpt = latest_checkpoint(run_dir) is not None
    if resume and saved.is_file():
        old = load_config(saved)
        if cfg is not None:
            cfg = _with_chosen(cfg, old)
            diff = config_differences(old, cfg)
            if diff:
                raise UserError(
                    f"--resume: the config differs from the one run {run_dir} was started with "
                    f"({'; '.join(diff)}); resume without --config, or start a new --out"
                )
            old.train.max_steps = cfg.train.max_steps
        return old
    if has_ckpt and resume:
        raise UserError(f"run folder {run_dir} has checkpoints but no {CONFIG_FILE}; it cannot be resumed")
    if has_ckpt:
        raise UserError(f"run folder {run_dir} already has checkpoints; pass --resume to continue it, or a new --out")
    if cfg is None:
        raise UserError(f"{run_dir} holds no run to resume; pass --config to start a new one")
    return cfg


def _with_chosen(request: RunConfig, old: RunConfig) -> RunConfig:
    """The request with the keys it leaves to the run (null) taken from the run's saved config."""
    request = copy.deepcopy(request)
    for section, key in CHOSEN_KEYS:
        if getattr(getattr(request, section), key) is None:
            setattr(getattr(request, section), key, getattr(getattr(old, section), key))
    return request


def resolve_with_store(cfg: RunConfig, store: LatentStore) -> tuple[RunConfig, ConditioningSpec, TextSource | None]:
    """The config with what the store decides filled in (text widths from its encoder, edm.sigma_data from its
    measured latent std when unset), the conditioning spec, and where the text embeddings come from."""
    cfg, spec, text = derive_spec(copy.deepcopy(cfg), store)
    if cfg.edm.sigma_data is None:
        std = store_sigma_data(store)
        if not std > 0:
            raise UserError(f"the latents of {store.path} have standard deviation {std}, so edm.sigma_data cannot "
                            "follow them; check the store (are all images the same?) or set edm.sigma_data")
        cfg.edm.sigma_data = std
    return cfg, spec, text


def record_run(run_dir: Path, cfg: RunConfig, store: LatentStore, spec: ConditioningSpec,
               plan: HeldoutPlan | None = None, zoom: LatentStore | None = None) -> None:
    """Rank 0 writes config.yaml and run.json (with the identity of the zoom store, when patches.zoom_p reads one);
    a fresh start (or a resume killed before its first checkpoint) also clears stale logs and checkpoint leftovers.
    A resume must be on latents of the same space, the same images and the same zoom store's images."""
    has_ckpt = latest_checkpoint(run_dir) is not None
    if has_ckpt:
        _check_same_latents(run_dir, store, zoom)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not has_ckpt:
        (run_dir / LOG_FILE).unlink(missing_ok=True)
        shutil.rmtree(run_dir / CKPT_DIR, ignore_errors=True)
        shutil.rmtree(run_dir / POSTHOC_DIR, ignore_errors=True)  # snapshots and reconstructions of that run
    save_config(cfg, run_dir / CONFIG_FILE)
    info = run_info(store, spec, heldout=None if plan is None else plan.to_dict(), zoom=zoom)
    if has_ckpt:  # a resume keeps the date the run was created
        try:
            info["created"] = json.loads((run_dir / RUN_FILE).read_text())["created"]
        except (OSError, KeyError, json.JSONDecodeError):
            pass
    write_json_atomic(run_dir / RUN_FILE, info)
