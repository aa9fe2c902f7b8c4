"""Checkpoints as folders of safetensors (no pickle), written atomically, kept by a retention rule.

    checkpoints/step-00000100/  model.safetensors  ema.safetensors  optimizer.safetensors  state.json
                                (and posthoc.safetensors when the run trains post-hoc EMA profiles)
    checkpoints/LATEST          names the newest complete checkpoint; written last
    checkpoints/BEST            names the checkpoint of the best held-out loss (when training evaluates one)

A checkpoint is written as `.tmp-step-XXXXXXXX`, fsynced, then renamed, so a killed run leaves either a
complete checkpoint or a `.tmp-` folder that every reader ignores. state.json records the sha256 of each
file, so a truncated or edited weights file is refused instead of loaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes
from torch import nn

from latentpatch.errors import Notice, UserError
from latentpatch.io import atomic_write_text, sha256_file

FORMAT_VERSION = 1
CKPT_DIR = "checkpoints"
LATEST = "LATEST"
BEST = "BEST"
WEIGHT_FILES = {"raw": "model.safetensors", "ema": "ema.safetensors"}
OPTIMIZER_FILE = "optimizer.safetensors"
POSTHOC_FILE = "posthoc.safetensors"  # the post-hoc EMA profiles (training/posthoc_ema.py), when the run has them
STATE_FILE = "state.json"
_NAME = re.compile(r"^step-(\d{8,})$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _step_of(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoint folders, oldest first (`.tmp-` leftovers of a killed run are not listed)."""
    root = Path(run_dir) / CKPT_DIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=_step_of)


def _pointed(run_dir: str | os.PathLike, pointer: str) -> tuple[str | None, Path | None]:
    """What a pointer file (LATEST, BEST) says, and the complete checkpoint folder it names (None if it is gone)."""
    root = Path(run_dir) / CKPT_DIR
    try:
        name = (root / pointer).read_text().strip()
    except OSError:
        return None, None
    return name, root / name if _NAME.match(name) and (root / name / STATE_FILE).is_file() else None


def _named(run_dir: str | os.PathLike, pointer: str) -> Path | None:
    """The complete checkpoint folder a pointer file (LATEST, BEST) names, or None."""
    return _pointed(run_dir, pointer)[1]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The folder LATEST names; the newest complete one if LATEST is missing (a kill between rename and LATEST)
    or names a checkpoint that is gone, which is said (a Notice) since it is not the one the run last wrote."""
    name, named = _pointed(run_dir, LATEST)
    if named is not None:
        return named
    found = list_checkpoints(run_dir)
    if name is not None and found:
        warnings.warn(f"{Path(run_dir) / CKPT_DIR / LATEST} names {name}, which is missing or incomplete (deleted?); "
                      f"using {found[-1].name}, the newest complete checkpoint", Notice, stacklevel=1)
    return found[-1] if found else None


def best_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    """The checkpoint of the best held-out loss (None when the run evaluates none)."""
    return _named(run_dir, BEST)


# --- state dicts <-> safetensors -------------------------------------------------------------------


def _cpu_tensors(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # A copy: safetensors refuses tensors that share storage, and a GPU tensor must come to the CPU anyway.
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in sd.items()}


def optimizer_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Flatten an optimizer state_dict: tensors as `PARAM.NAME`, everything else as JSON metadata."""
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for pid, entry in sd["state"].items():
        for name, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"{pid}.{name}"] = value
            else:
                scalars[f"{pid}.{name}"] = value
    meta = {"param_groups": sd["param_groups"], "scalars": scalars}
    return _cpu_tensors(tensors), {"optimizer": json.dumps(meta)}


def optimizer_from_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict:
    """The inverse of optimizer_to_tensors: a state_dict for `optimizer.load_state_dict`."""
    meta = json.loads(metadata["optimizer"])
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    data = path.read_bytes()
    try:
        tensors = load_safetensors_bytes(data)
        n = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + n]).get("__metadata__", {}) or {}
    except (SafetensorError, ValueError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({e}); the checkpoint is damaged") from e
    return tensors, metadata


# --- save, retention, load -------------------------------------------------------------------------


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    run_dir: str | os.PathLike, step: int, model: nn.Module, ema: nn.Module,
    optimizer: torch.optim.Optimizer, state: dict[str, Any], keep: int = 0, best: bool = False,
    posthoc: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write step-XXXXXXXX atomically, point LATEST (and with `best`, BEST) at it, then apply the retention
    rule (keep the newest `keep`, and the best). `posthoc`: the post-hoc EMA profiles' tensors, if any."""
    root = Path(run_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(step)
    for stale in root.glob(".tmp-*"):  # leftovers of a killed run; one writer per run, so none is live
        shutil.rmtree(stale, ignore_errors=True)
    opt_tensors, opt_meta = optimizer_to_tensors(optimizer)
    blobs = {
        WEIGHT_FILES["raw"]: save_safetensors_bytes(_cpu_tensors(model.state_dict()), metadata={"step": str(step)}),
        WEIGHT_FILES["ema"]: save_safetensors_bytes(_cpu_tensors(ema.state_dict()), metadata={"step": str(step)}),
        OPTIMIZER_FILE: save_safetensors_bytes(opt_tensors, metadata=opt_meta),
    }
    if posthoc is not None:
        blobs[POSTHOC_FILE] = save_safetensors_bytes(_cpu_tensors(posthoc), metadata={"step": str(step)})
    final = write_checkpoint_folder(root / name, blobs, {"step": step, **state},
                                    "the previous checkpoint is still the latest")
    atomic_write_text(root / LATEST, name + "\n")
    if best:
        atomic_write_text(root / BEST, name + "\n")
    apply_retention(run_dir, keep)
    return final


def write_checkpoint_folder(final: Path, blobs: dict[str, bytes], record: dict[str, Any], kept: str) -> Path:
    """Folder `final` holding the files `blobs` (name -> bytes) and state.json (format_version, `record`, each
    file's sha256), written as `.tmp-NAME`, fsynced and renamed; a folder of the same name is replaced whole.
    `kept` says what is left when the write fails."""
    tmp = final.parent / f".tmp-{final.name}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    record = {"format_version": FORMAT_VERSION, **record,
              "files": {fname: hashlib.sha256(data).hexdigest() for fname, data in blobs.items()}}
    try:  # a full disk must not leave a half-written checkpoint (nor a raw traceback)
        for fname, data in blobs.items():
            _write_synced(tmp / fname, data)
        _write_synced(tmp / STATE_FILE, (json.dumps(record, indent=1) + "\n").encode())
        _fsync_dir(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not write checkpoint {final}: {e.strerror or e} (nothing was left half-written; "
                        f"{kept})") from e
    if final.exists():  # the same step written again (a rerun after a kill): replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    return final


def apply_retention(run_dir: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest `keep` complete checkpoints (keep <= 0 keeps all); never one LATEST or BEST names."""
    if keep <= 0:
        return []
    kept = {p.resolve() for p in (latest_checkpoint(run_dir), best_checkpoint(run_dir)) if p is not None}
    found = list_checkpoints(run_dir)
    doomed = [p for p in found[: max(len(found) - keep, 0)] if p.resolve() not in kept]
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def read_state(ckpt: Path) -> dict[str, Any]:
    try:
        state = json.loads((ckpt / STATE_FILE).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"checkpoint {ckpt} has no readable {STATE_FILE} ({e})") from e
    if state.get("format_version") != FORMAT_VERSION:
        raise UserError(f"checkpoint {ckpt} has format_version {state.get('format_version')}; "
                        f"this latentpatch reads {FORMAT_VERSION}")
    return state


def verified_file(ckpt: Path, fname: str, state: dict[str, Any]) -> Path:
    """The path of a checkpoint file whose sha256 matches state.json (UserError if truncated or edited)."""
    path = ckpt / fname
    if not path.is_file():
        raise UserError(f"checkpoint {ckpt} lacks {fname}")
    expected = state.get("files", {}).get(fname)
    if expected is None or sha256_file(path) != expected:
        raise UserError(f"{path} does not match the sha256 recorded in {ckpt / STATE_FILE}: the file was "
                        "truncated or changed after it was written; use another checkpoint")
    return path


def load_weights(module: nn.Module, path: Path) -> None:
    tensors, _ = _read_safetensors(path)
    misfit = _misfit(module.state_dict(), tensors)
    if misfit:
        raise UserError(f"{path} does not fit the model built from the run's config: {misfit}; was the run's "
                        "config.yaml edited after this checkpoint was written?")
    module.load_state_dict(tensors, strict=True)


def _misfit(want: dict[str, torch.Tensor], have: dict[str, torch.Tensor]) -> str:
    """The first tensor a checkpoint gets wrong, in one line (torch's own message lists every one)."""
    shape = [k for k in want if k in have and have[k].shape != want[k].shape]
    missing = [k for k in want if k not in have]
    extra = [k for k in have if k not in want]
    more = lambda keys: f" ({len(keys) - 1} more like it)" if len(keys) > 1 else ""  # noqa: E731
    if shape:
        k = shape[0]
        return (f"tensor {k} is {list(have[k].shape)} in the checkpoint and {list(want[k].shape)} in the model"
                + more(shape))
    if missing:
        return f"the checkpoint has no tensor {missing[0]}{more(missing)}"
    if extra:
        return f"the checkpoint has a tensor {extra[0]} the model lacks{more(extra)}"
    return ""


def load_checkpoint(ckpt: Path, model: nn.Module, ema: nn.Module, optimizer: torch.optim.Optimizer,
                    posthoc=None) -> dict[str, Any]:
    """Load weights, EMA and optimizer state in place (and `posthoc`, post-hoc EMA profiles, from their file);
    returns state.json (step, nimg, ...)."""
    state = read_state(ckpt)
    load_weights(model, verified_file(ckpt, WEIGHT_FILES["raw"], state))
    load_weights(ema, verified_file(ckpt, WEIGHT_FILES["ema"], state))
    tensors, meta = _read_safetensors(verified_file(ckpt, OPTIMIZER_FILE, state))
    optimizer.load_state_dict(optimizer_from_tensors(tensors, meta))
    if posthoc is not None:
        path = verified_file(ckpt, POSTHOC_FILE, state)
        posthoc.load_state_dict(_read_safetensors(path)[0], where=str(path))
    return state


def resolve_checkpoint(run_dir: Path, checkpoint: str | int | os.PathLike | None) -> Path:
    """None or "best": the best held-out checkpoint, else the latest; "latest": the latest; an int or "100": that
    step; a name or a path: that folder."""
    best_name, best = _pointed(run_dir, BEST)
    if checkpoint in (None, "best") and best_name is not None and best is None:
        what = f"{run_dir / CKPT_DIR / BEST} names {best_name}, which is missing or incomplete (deleted?)"
        if checkpoint == "best":
            raise UserError(f"{what}; pass --checkpoint latest or a step")
        warnings.warn(f"{what}; using the latest checkpoint instead", Notice, stacklevel=2)
    if checkpoint == "best" and best is None:
        raise UserError(f"run {run_dir} has no best checkpoint: it was trained without held-out evaluation "
                        "(heldout.every); use --checkpoint latest")
    if checkpoint in (None, "best", "latest"):
        found = (best if checkpoint != "latest" else None) or latest_checkpoint(run_dir)
        if found is None:
            raise UserError(f"run folder {run_dir} has no checkpoint yet (nothing in {run_dir / CKPT_DIR})")
        return found
    text = str(checkpoint)
    candidates = [Path(text), run_dir / CKPT_DIR / text]
    if text.isdigit():
        candidates.insert(0, run_dir / CKPT_DIR / checkpoint_name(int(text)))
    for path in candidates:
        if (path / STATE_FILE).is_file():
            return path
    names = ", ".join(p.name for p in list_checkpoints(run_dir)) or "none"
    raise UserError(f"checkpoint {text!r} not found in {run_dir / CKPT_DIR} (available: {names})")
