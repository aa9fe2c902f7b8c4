"""The run folder's contract: the resolved config and run.json, checked again on every resume.

A run can always be reproduced and sampled from its folder alone; a resume that would silently train a
different configuration, or on latents from a different autoencoder, is refused with the keys that differ.
"""

from __future__ import annotations

import datetime
import json
import shutil
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

import latentpatch
from latentpatch.config import RunConfig, config_to_dict, load_config, save_config
from latentpatch.data.store import LatentStore
from latentpatch.errors import UserError
from latentpatch.io import write_json_atomic
from latentpatch.training.checkpoint import CKPT_DIR, latest_checkpoint
from latentpatch.training.logging import LOG_FILE

RUN_FORMAT_VERSION = 1
CONFIG_FILE = "config.yaml"
RUN_FILE = "run.json"
RESUMABLE_KEYS = ("train.max_steps",)  # may change between a run and its resume
LOCK_FILE = ".train.lock"


def lock_run(run_dir: Path) -> FileLock:
    """Hold the run folder's lock (non-blocking): a second train into it would clear or mix its checkpoints."""
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"--out {run_dir} is a file; pass a folder for the run")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = FileLock(run_dir / LOCK_FILE)
        lock.acquire(blocking=False)
    except Timeout:
        raise UserError(
            f"another train is writing to run folder {run_dir} (it holds {run_dir / LOCK_FILE}); wait for it "
            "to finish or pick another --out"
        ) from None
    except OSError as e:
        raise UserError(f"cannot write to run folder {run_dir}: {e.strerror or e}") from e
    return lock


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): tree}


def config_differences(a: RunConfig, b: RunConfig, ignore: tuple[str, ...] = RESUMABLE_KEYS) -> list[str]:
    """Dotted keys whose values differ, as 'key: a -> b'."""
    fa, fb = _flatten(config_to_dict(a)), _flatten(config_to_dict(b))
    return [f"{k}: {fa.get(k)!r} -> {fb.get(k)!r}" for k in sorted(set(fa) | set(fb))
            if k not in ignore and fa.get(k) != fb.get(k)]


def run_info(store: LatentStore, cfg: RunConfig) -> dict[str, Any]:
    """run.json: what sampling needs besides the config (the autoencoder that decodes, the latent shape)."""
    manifest = store.manifest
    return {
        "format_version": RUN_FORMAT_VERSION,
        "latents": str(store.path.resolve()),
        "autoencoder": store.info.to_dict(),
        "latent_shape": list(store.latent_shape),
        "resolution": list(store.resolution),
        "num_classes": cfg.model.num_classes,
        "class_names": manifest.get("class_names"),
        "text_encoder": manifest.get("text_encoder"),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "latentpatch_version": latentpatch.__version__,
    }


def _check_same_latents(run_dir: Path, store: LatentStore) -> None:
    try:
        old = json.loads((run_dir / RUN_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return  # killed before run.json was written: nothing to compare, it is rewritten below
    for key, now in (("autoencoder", store.info.to_dict()), ("latent_shape", list(store.latent_shape))):
        if old.get(key) != now:
            raise UserError(
                f"--resume: run {run_dir} was trained on latents with {key} {old.get(key)}, but store "
                f"{store.path} has {now}; resume with the run's own store ({old.get('latents')})"
            )


def prepare_run(
    run_dir: Path, cfg: RunConfig | None, store: LatentStore, resume: bool, max_steps: int | None,
    write: bool,
) -> RunConfig:
    """Check `run_dir` against the request, return the config to train with; rank 0 (`write`) records it.

    A new run into a folder with checkpoints is refused (use --resume or a new --out); a resume keeps
    the saved config and refuses a different one, except for train.max_steps.
    """
    saved = run_dir / CONFIG_FILE
    has_ckpt = latest_checkpoint(run_dir) is not None
    if resume and saved.is_file():
        old = load_config(saved)
        if cfg is not None:
            diff = config_differences(old, cfg)
            if diff:
                raise UserError(
                    f"--resume: the config differs from the one run {run_dir} was started with "
                    f"({'; '.join(diff)}); resume without --config, or start a new --out"
                )
            old.train.max_steps = cfg.train.max_steps
        cfg = old
        _check_same_latents(run_dir, store)
    elif has_ckpt and resume:
        raise UserError(f"run folder {run_dir} has checkpoints but no {CONFIG_FILE}; it cannot be resumed")
    elif has_ckpt:
        raise UserError(
            f"run folder {run_dir} already has checkpoints; pass --resume to continue it, or a new --out"
        )
    elif cfg is None:
        raise UserError(f"{run_dir} holds no run to resume; pass --config to start a new one")
    if max_steps is not None:
        cfg.train.max_steps = int(max_steps)
    if write:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not has_ckpt:  # a fresh start (or a resume killed before its first checkpoint): no stale logs
            (run_dir / LOG_FILE).unlink(missing_ok=True)
            shutil.rmtree(run_dir / CKPT_DIR, ignore_errors=True)
        save_config(cfg, saved)
        info = run_info(store, cfg)
        if has_ckpt:  # a resume keeps the date the run was created
            try:
                info["created"] = json.loads((run_dir / RUN_FILE).read_text())["created"]
            except (OSError, KeyError, json.JSONDecodeError):
                pass
        write_json_atomic(run_dir / RUN_FILE, info)
    return cfg
