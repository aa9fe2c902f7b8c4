"""What a rerun of encode has to do: the image folder compared with the store's manifest (new, changed,
unchanged, or known to be unreadable), by relative path, size and mtime, and sha256 where those moved."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from latentpatch.data.images import SMALLER
from latentpatch.data.manifest import Item, Manifest
from latentpatch.io import sha256_file


@dataclass
class UpdatePlan:
    """What a run has to do, from comparing the folder with the manifest."""

    todo: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    remembered_skips: list[dict[str, Any]] = field(default_factory=list)
    unchanged: int = 0
    captions_updated: int = 0
    missing: int = 0
    dirty: bool = False  # the manifest changed without a new shard


def plan_update(
    manifest: Manifest, src: Path, files: list[str], captions: dict[str, str | None], *, rehash: bool = False,
    upscale_small: bool = False,
) -> UpdatePlan:
    """Compare the folder with the manifest: unchanged files are kept, changed ones lose their rows.

    A file whose size and mtime match the manifest is taken as unchanged without hashing (as make and rsync
    do); `rehash` hashes every file. Stale rows are dropped from `manifest` and refreshed stats and captions
    written into it; the caller saves it.
    """
    plan = UpdatePlan()
    stored: dict[str, list[Item]] = {}
    for item in manifest.items:
        stored.setdefault(item.file, []).append(item)
    skips = {s["file"]: s for s in manifest.skipped}
    stale: set[str] = set()
    for f in files:
        try:
            st = (src / f).stat()
        except OSError:  # a broken link, a symlink loop, no permission
            skip = skips.get(f)
            if skip is not None and skip["size"] is None and skip["mtime_ns"] is None:
                plan.remembered_skips.append(skip)  # could not be read last time either: nothing to redo
            else:
                plan.todo.append(f)  # decoding will report it as unreadable
            continue
        stat = (st.st_size, st.st_mtime_ns)
        if f in stored:
            views = stored[f]
            moved = (views[0].size, views[0].mtime_ns) != stat
            if rehash or moved:
                if _hash_or_none(src / f) != views[0].sha256:
                    stale.add(f)
                    plan.changed.append(f)
                    plan.todo.append(f)
                    continue
                for v in views:
                    v.size, v.mtime_ns = stat
                plan.dirty |= moved
            plan.unchanged += 1
            if views[0].caption != captions[f]:
                for v in views:
                    v.caption = captions[f]
                plan.captions_updated += 1
                plan.dirty = True
        elif f in skips and (skips[f]["size"], skips[f]["mtime_ns"]) == stat and not (
            upscale_small and skips[f]["reason"] == SMALLER
        ):
            plan.remembered_skips.append(skips[f])  # the same bytes would fail the same way
        else:
            plan.todo.append(f)
    if stale:
        manifest.items = [i for i in manifest.items if i.file not in stale]
        plan.dirty = True
    plan.dirty |= len(plan.remembered_skips) != len(skips)
    plan.missing = len({i.file for i in manifest.items} - set(files))
    return plan


def _hash_or_none(path: Path) -> str | None:
    try:
        return sha256_file(path)
    except OSError:
        return None  # gone or unreadable since the scan: decoding it again will say which
