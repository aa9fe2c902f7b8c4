"""The export folder itself: refusing to overwrite, writing into a staging folder that replaces OUT only when
complete, the component entries of model_index.json, and the shipped code copied beside the weights."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from latentpatch.errors import UserError

MODEL_INDEX = "model_index.json"
# Classes whose code the folder ships (latentpatch.exporting.shipped): their model_index.json entry names the file.
SHIPPED_CLASSES = {"LatentPatchDiT": "latentpatch_dit", "EDMHeunScheduler": "scheduling_edm_heun"}


def check_out(out: Path, run: Path, force: bool) -> None:
    """UserError, before anything is loaded, for an OUT that exists (without `force`) or would take the run."""
    out_r, run_r = out.resolve(), run.resolve()
    if out_r == run_r or out_r in run_r.parents:
        raise UserError(f"{out} would replace the run folder {run} (or the folder holding it); export elsewhere")
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is a file; give a folder path for the export")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise UserError(f"{out} exists; pass --force (force=True) to replace it")


@contextlib.contextmanager
def staged(out: Path) -> Iterator[Path]:
    """A fresh folder beside `out` to write into; it replaces `out` only when the block completes, so a failed
    export leaves `out` as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, old = out.parent / f".{out.name}.export-tmp", out.parent / f".{out.name}.export-old"
    for leftover in (tmp, old):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def component_entry(obj: Any) -> list[str | None]:
    """model_index.json's [library or shipped module, class] of a pipeline component ([None, None]: absent)."""
    if obj is None:
        return [None, None]
    name = type(obj).__name__
    if name in SHIPPED_CLASSES:
        return [SHIPPED_CLASSES[name], name]
    return [type(obj).__module__.split(".")[0], name]


def copy_shipped(module: str, folder: Path) -> None:
    """shipped/MODULE.py into `folder`, byte for byte (diffusers loads it from there with trust_remote_code)."""
    from latentpatch.exporting.shipped import SHIPPED_DIR

    folder.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(SHIPPED_DIR / f"{module}.py", folder / f"{module}.py")


def save_component(folder: Path, name: str, obj: Any) -> list[str | None]:
    """`obj`.save_pretrained(folder/name) (safetensors), its shipped code beside it; its model_index entry."""
    if obj is None:
        return [None, None]
    obj.save_pretrained(folder / name)
    module = SHIPPED_CLASSES.get(type(obj).__name__)
    if module is not None:
        copy_shipped(module, folder / name)
    return component_entry(obj)


def write_model_index(folder: Path, pipeline: tuple[str, str], components: dict[str, list], config: dict) -> None:
    """model_index.json naming the pipeline file and class, each component and the pipeline's own config."""
    import diffusers

    index = {"_class_name": list(pipeline), "_diffusers_version": diffusers.__version__, **components, **config}
    (folder / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")
