"""The crop-cost curve: what a step of half-side and quarter-side crops costs against a full-size step, as the
latent grows. Attention's share of a step grows with the token count, so a crop (a quarter of the tokens at half
the side, twice the batch: the schedule's batch growth) should cost less per pixel the larger the latent.

Each cell (model, latent side, crop) is the real trainer (`latentpatch.training.train` on a store of random
latents: a step's cost does not depend on the values), timed step to step through its callback as process CPU
seconds of one torch thread (a shared machine's load does not count). Rounds interleave every cell, so a drift of
the machine weighs on all of them alike; medians and ranges over the timed steps of every round.

    OMP_NUM_THREADS=1 python -m benchmarks.speed.crop_cost --out DIR --models demo,DiT-S/2 --latents 16,32,64
    OMP_NUM_THREADS=1 python -m benchmarks.speed.crop_cost --out DIR --models demo --latents 128 --steps 2

Writes DIR/crop-cost.json (every timed step of every cell, so a table can be redrawn; a rerun adds the cells it
lacks), DIR/crop-cost.md and DIR/crop-cost.png.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from latentpatch.io import atomic_write_text, write_json_atomic

from ..throughput.synthetic import make_store
from .arms import COMMON

MODELS = {  # config overrides and the full-size batch (crops take batch_growth 2 per halving of the side)
    "demo": ([o for o in COMMON if o.startswith("model.dit.")], 16),
    "DiT-S/2": (["model.dit.preset=DiT-S/2"], 16),
}
CROPS = {"full": 1.0, "half": 0.5, "quarter": 0.25}  # side of the crop / side of the latent


def cell_config(model: str, crop: str, batch: int):
    from latentpatch.config import load_config

    size = CROPS[crop]
    patches = ["patches.real_p=1", "patches.sizes=[]"] if size == 1 else ["patches.real_p=0", f"patches.sizes=[{size}]"]
    return load_config(None, MODELS[model][0] + patches + [
        "model.attention=sdpa", f"train.batch_size={batch}", "train.precision=fp32", "edm.sigma_data=1.0",
        "optim.warmup_steps=1", "train.log_every=100000", "train.ckpt_every=100000", "train.keep_checkpoints=1",
        "heldout.share=0", "heldout.every=0", "routing.share=0"])


def time_cell(model: str, crop: str, batch: int, steps: int, store: Path) -> list[float]:
    """Process CPU seconds of `steps` trainer steps after one untimed step (first allocations)."""
    from latentpatch.training.trainer import train

    cfg = cell_config(model, crop, batch)
    cfg.train.max_steps = steps + 1
    times: list[float] = []
    last: list[float] = []

    def callback(info) -> None:
        now = time.process_time()
        if last:
            times.append(now - last[0])
        last[:] = [time.process_time()]

    with tempfile.TemporaryDirectory() as tmp:
        train(cfg, store, Path(tmp) / "run", device="cpu", progress=False, callback=callback)
    return times


def key(model: str, batch: int, latent: int, crop: str) -> str:
    return f"{model}|{batch}|{latent}|{crop}"


def measure(args, saved: dict, path: Path) -> dict:
    """Adds every missing cell's timed steps to `saved`, round after round (written after each cell)."""
    models, latents = args.models.split(","), [int(x) for x in args.latents.split(",")]
    batch = {m: args.batch or MODELS[m][1] for m in models}
    todo = [(m, s, c) for m in models for s in latents for c in CROPS
            if len(saved.get(key(m, batch[m], s, c), [])) < args.rounds * args.steps]
    with tempfile.TemporaryDirectory() as tmp:
        stores = {s: make_store(Path(tmp) / f"store{s}", s) for s in {s for _, s, _ in todo}}
        for r in range(args.rounds):
            for m, s, c in todo:
                k = key(m, batch[m], s, c)
                if len(saved.get(k, [])) >= args.rounds * args.steps:
                    continue
                t0 = time.perf_counter()
                saved.setdefault(k, []).extend(time_cell(m, c, batch[m], args.steps, stores[s]))
                write_json_atomic(path, saved)
                print(f"  round {r + 1}: {m} {s}x{s} {c}: {statistics.median(saved[k][-args.steps:]):.3f} s/step "
                      f"({time.perf_counter() - t0:.0f} s wall)", flush=True)
    return saved


def summary(saved: dict) -> dict[tuple[str, int, int], dict[str, tuple[float, float, float]]]:
    """{(model, full-size batch, latent): {crop: (median, min, max) seconds per step}} of the cells measured."""
    out: dict = {}
    for k, times in saved.items():
        m, b, s, c = k.split("|")
        out.setdefault((m, int(b), int(s)), {})[c] = (statistics.median(times), min(times), max(times))
    return dict(sorted(out.items()))


def ratio_range(crop: tuple[float, float, float], full: tuple[float, float, float]) -> tuple[float, float, float]:
    """crop/full: the ratio of medians and its range (fastest crop over slowest full to the reverse)."""
    return crop[0] / full[0], crop[1] / full[2], crop[2] / full[1]


def table(saved: dict) -> str:
    lines = ["| model | latent | tokens | full s/step | half s/step | quarter s/step | half/full | quarter/full |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for (m, b, s), cells in summary(saved).items():
        cols = [f"{cells[c][0]:.3f} ({cells[c][1]:.3f}-{cells[c][2]:.3f})" if c in cells else "-" for c in CROPS]
        ratios = [("%.3f (%.3f-%.3f)" % ratio_range(cells[c], cells["full"])) if c in cells and "full" in cells
                  else "-" for c in ("half", "quarter")]
        lines.append(f"| {m} (b{b}/{2 * b}/{4 * b}) | {s}x{s} | {(s // 2) ** 2} | " + " | ".join(cols + ratios) + " |")
    return "\n".join(lines) + "\n"


def plot(saved: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=110)
    by_model: dict = {}
    for (m, b, s), cells in summary(saved).items():
        by_model.setdefault(f"{m} b{b}", []).append((s, cells))
    for k, (m, rows) in enumerate(by_model.items()):
        for c, style in (("half", "-"), ("quarter", "--")):
            pts = [(s, ratio_range(cells[c], cells["full"])) for s, cells in rows if c in cells and "full" in cells]
            if not pts:
                continue
            xs = [s for s, _ in pts]
            ax.errorbar(xs, [r[0] for _, r in pts], yerr=[[r[0] - r[1] for _, r in pts], [r[2] - r[0] for _, r in pts]],
                        fmt="o" + style, color=f"C{k}", capsize=3, label=f"{m}: {c}-side crops / full-size step")
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xticks([16, 32, 64, 128], ["16", "32", "64", "128"])
    ax.set_xlabel("latent side (DiT patch 2: tokens = (side/2)^2)")
    ax.set_ylabel("step time, crop / full size (batch x2 per halving)")
    ax.set_title("What a crop step costs against a full-size step (1 CPU thread, process time)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--models", default="demo,DiT-S/2", help=f"comma-separated: {', '.join(MODELS)}")
    ap.add_argument("--latents", default="16,32,64", help="latent sides")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per cell and round")
    ap.add_argument("--batch", type=int, default=None, help="full-size batch (default: the model's, 16)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "crop-cost.json"
    saved = measure(args, json.loads(path.read_text()) if path.is_file() else {}, path)
    atomic_write_text(args.out / "crop-cost.md", table(saved))
    plot(saved, args.out / "crop-cost.png")
    print(table(saved), flush=True)


if __name__ == "__main__":
    main()
