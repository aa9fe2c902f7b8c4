"""The arms' names before they said what they change (docs/benchmarks.md has the table), and the one-time
rename of what a result folder holds under them, so that its runs and step times are reused.

"paper" was the paper's latent schedule as first run here (sigma_data 0.5); "corrected" put the crops on the
token grid and sigma_data at the store's std; "paper+sigma" kept any offset with the store's std and became
the library's default. Arms that set config keys the library no longer has are gone (REMOVED).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from latentpatch.io import write_json_atomic

RENAMED = {
    "paper": "half-crops/sd0.5",
    "paper+aligned": "half-crops/aligned/sd0.5",
    "paper+sigma": "half-crops",
    "corrected": "half-crops/aligned",
    "corrected/real_p0.25": "half-crops/aligned/real_p0.25",
    "corrected/quarter": "half-crops/aligned/quarter",
    "corrected+routing": "half-crops/aligned/routing",
    "routing": "full-size/routing",
    "paper+sigma/quarter": "half-crops/quarter",
    "paper+sigma/real_p0.25": "half-crops/real_p0.25",
    "paper+sigma+zoom": "half-crops/zoom",
    "paper+sigma+phema": "half-crops+phema",
}
REMOVED = {  # old name: the config key it set, removed from the library
    "corrected+area": "patches.loss_weighting", "corrected+ema-samples": "train.ema_count",
    "corrected/progressive": "patches.progressive_steps", "corrected/no-location": "patches.coordinates",
    "paper+sigma+coupled": "patches.sigma_overlap", "paper+sigma+coupled-high": "patches.sigma_order",
    "paper+sigma+snr5": "edm.snr_cap", "full-size+snr5": "edm.snr_cap", "paper+sigma+ema-samples": "train.ema_count",
}


def folder_name(arm: str) -> str:
    """An arm's folder name under runs/ and samples/NAME/."""
    return arm.replace("/", "_")


def unknown_arm_hint(arm: str) -> str:
    """What to say about an arm name that is not in ARMS."""
    if arm in RENAMED:
        return f"{arm} is now called {RENAMED[arm]}"
    if arm in REMOVED:
        return f"{arm} was removed with {REMOVED[arm]}"
    return f"unknown arm {arm}"


def rename_step_times(out: Path) -> list[str]:
    """Renames the arms of OUT/step_times.json written under old names (a new name already there wins);
    returns what it renamed, 'step_times.json: OLD -> NEW' (a rerun: nothing)."""
    path = out / "step_times.json"
    if not path.is_file():
        return []
    saved = json.loads(path.read_text())
    renamed = {arm: RENAMED[arm] for arm in saved if arm in RENAMED and RENAMED[arm] not in saved}
    if renamed:
        write_json_atomic(path, {renamed.get(arm, arm): rows for arm, rows in saved.items()})
    return [f"{path.name}: {old} -> {new}" for old, new in renamed.items()]


def rename_folders(parent: Path, folder: Callable[[str], str]) -> list[str]:
    """Renames parent/folder(old) to parent/folder(new) for every renamed arm whose new folder is not there yet:
    a run folder records no path of its own, so it resumes and serves under its new name. Returns the renamed.
    (Sample folders are not renamed: a job records its run's path, so they are sampled anew.)"""
    done = []
    for old, new in RENAMED.items():
        src, dst = parent / folder(old), parent / folder(new)
        if src.is_dir() and not dst.exists():
            src.rename(dst)
            done.append(f"{src} -> {dst.name}")
    return done
