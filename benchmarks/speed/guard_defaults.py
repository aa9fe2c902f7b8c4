"""What the small-store guard buys on faces20: the held-out loss of the checkpoint `sample` loads, with the default
settings (10% of the 20 training faces held out, 40 evaluations, BEST kept, early stop after 10 without a new
best) against a run to max_steps without them (the old defaults: `sample` took the last checkpoint).

Both are scored on faces 80-99 (never seen by either; the same 20 held-out faces as speed to quality) by
`latentpatch eval`'s held-out loss, for the full-size and the default patch schedule (half-crops), one seed.
From the repository root:

    python -m benchmarks.speed.guard_defaults --out guard20 --steps 2400 --jobs 2 --settings guarded
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..one_thread import run_python, side_by_side
from .arms import ARMS, COMMON
from .data import prepare_data
from .renames import folder_name, rename_folders, unknown_arm_hint

GUARDED = ["heldout.latents=null", "heldout.share=null", "heldout.every=null", "train.patience=null"]
UNGUARDED = ["heldout.latents=null", "heldout.share=0", "heldout.every=0", "train.patience=0"]


def train_one(out: Path, store: Path, overrides: list[str]) -> None:
    """One run in its own single-threaded process (the arms share the machine fairly)."""
    code = ("import sys; from latentpatch.config import load_config; from latentpatch.training.trainer import train; "
            "r = train(load_config(None, sys.argv[3:]), sys.argv[1], sys.argv[2], device='cpu', progress=False); "
            "print(r.summary() or f'trained to step {r.step}')")
    done = run_python(["-c", code, str(store), str(out), *overrides], out.name)
    (out / "stdout.txt").write_text(done.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True, type=Path)
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arms", default="full-size,half-crops")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--settings", default="guarded,unguarded", help="guarded (the defaults) and/or unguarded")
    args = ap.parse_args()
    unknown = [unknown_arm_hint(a) for a in args.arms.split(",") if a not in ARMS]
    if unknown:
        print(f"error: {'; '.join(unknown)} (arms: {', '.join(ARMS)})", file=sys.stderr)
        sys.exit(2)
    from latentpatch.checkpoints import latest_checkpoint
    from latentpatch.metrics.denoising import run_denoising_loss
    from latentpatch.runs import load_run

    data = prepare_data(args.out, "faces20")
    for kind in ("guarded", "unguarded"):  # folders written under the arms' old names
        rename_folders(args.out, lambda arm, kind=kind: f"{folder_name(arm)}-{kind}")
    runs = {(arm, kind): (args.out / f"{folder_name(arm)}-{kind}", COMMON + ARMS[arm] + extra + [
        f"train.seed={args.seed}", f"train.max_steps={args.steps}"])
        for arm in args.arms.split(",") for kind, extra in (("guarded", GUARDED), ("unguarded", UNGUARDED))
        if kind in args.settings.split(",")}
    todo = [(out, data["train"], over) for out, over in runs.values() if latest_checkpoint(out) is None]
    side_by_side(lambda job: train_one(*job), todo, args.jobs)
    rows = []
    for (arm, kind), (out, _) in runs.items():
        sampled = load_run(out, device="cpu")  # what `sample` loads: BEST when there is one, else the latest
        last = load_run(out, checkpoint="latest", device="cpu")
        scores = [run_denoising_loss(r, data["heldout"]).mean for r in (sampled, last)]
        rows.append({"arm": arm, "settings": kind, "sampled_step": sampled.step, "sampled_loss": scores[0],
                     "last_step": last.step, "last_loss": scores[1],
                     "line": (out / "stdout.txt").read_text().strip().splitlines()[-1]})
        print(json.dumps(rows[-1]), flush=True)
    (args.out / "guard_defaults.json").write_text(json.dumps(rows, indent=1))
    print("\n| arm | settings | `sample` loads | its loss on faces 80-99 | last checkpoint | its loss |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['arm']} | {r['settings']} | step {r['sampled_step']} | {r['sampled_loss']:.4f} | "
              f"step {r['last_step']} | {r['last_loss']:.4f} |")


if __name__ == "__main__":
    main()
