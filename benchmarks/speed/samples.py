"""Samples of each arm's best checkpoint, and their FID, KID and SWD against the regime's reference images."""

from __future__ import annotations

import json
from pathlib import Path

from latentpatch.metrics.evaluate import evaluate_folders
from latentpatch.sampling.generate import sample

from .renames import folder_name


def sample_metrics(runs: dict[str, Path], data: dict, out: Path, n: int, sample_steps: int,
                   prompt: str | None = None) -> tuple[dict, dict]:
    """n samples of each arm's best checkpoint (what `sample` loads) into out/ARM, given `prompt` (a text run);
    FID, KID and SWD against data["reference"]. `out` is per result name: a longer budget's best checkpoint is
    another job. Returns ({arm: metrics}, {arm: its grid.png})."""
    from latentpatch.metrics.inception import load_inception

    extractor, metrics, grids = None, {}, {}
    for arm, run in runs.items():
        folder = out / folder_name(arm)
        text = {} if prompt is None else {"prompts": prompt}
        sample(run, n=n, steps=sample_steps, seed=1, batch_size=64, device="cpu", out=folder, output="none", **text)
        if extractor is None:
            extractor = load_inception()
        r = evaluate_folders(folder, data["reference"], metrics="fid,kid,swd", extractor=extractor,
                             report=folder / "eval.json", device="cpu")["metrics"]
        metrics[arm] = {"fid": r["fid"], "kid": r["kid"], "kid_std": r["kid_std"], "swd": r["swd"]["mean"],
                        "checkpoint_step": json.loads((folder / "job.json").read_text())["settings"]["step"]}
        grids[arm] = folder / "grid.png"
        print(f"  samples {arm}: FID {r['fid']:.1f}, SWD {r['swd']['mean']:.1f}", flush=True)
    return metrics, grids
