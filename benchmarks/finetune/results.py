"""What the channels experiments keep of each run: its held-out curve, its process CPU seconds, how much its
coordinate weights grew; per arm the best and final loss over seeds, and the seed-paired difference of two arms."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from latentpatch.training.logging import read_log


def curve(run: Path) -> list[list[float]]:
    """[step, held-out loss] of each evaluation of a run, in order."""
    return [[r["step"], r["heldout_loss"]] for r in read_log(run / "log.jsonl") if "heldout_loss" in r]


def cpu_seconds(run: Path) -> float:
    return json.loads((run / "cpu.json").read_text())["process_cpu_s"]


def coordinate_weight_share(run: Path, weight: str) -> float | None:
    """|W_coords| / |W_latent| of the layer reading the coordinates (state key `weight`, fine-tuned, EMA): how much
    the channels came to be used; None where the network reads none."""
    from latentpatch.runs import load_run

    precond = load_run(run, checkpoint="latest").precond
    if not precond.net.coordinate_inputs:
        return None
    w, c = precond.state_dict()[weight], precond.net.latent_channels
    return float(w[:, c:].norm() / w[:, :c].norm())


def run_record(run: Path, weight: str) -> dict:
    points = curve(run)
    best = min(points, key=lambda p: p[1])
    return {"curve": points, "best": best[1], "best_step": best[0], "final": points[-1][1],
            "cpu_s": cpu_seconds(run), "coordinate_weight_share": coordinate_weight_share(run, weight)}


def spread(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def summarise(runs: dict[str, dict[int, dict]], control: str, treatment: str) -> dict:
    """Per arm: best and final held-out loss over seeds; paired by seed: treatment - control."""
    out = {}
    for arm, by_seed in runs.items():
        out[arm] = {k: spread([r[k] for r in by_seed.values()]) for k in ("best", "final")}
    seeds = sorted(runs[control])
    diff = out[f"{treatment}_minus_{control}"] = {
        k: {"per_seed": [runs[treatment][s][k] - runs[control][s][k] for s in seeds]} for k in ("best", "final")}
    for d in diff.values():
        d.update(spread(d["per_seed"]))
    return out


def largest_gap(runs: dict[str, dict[int, dict]], control: str, treatment: str) -> float:
    """The largest |treatment - control| held-out loss at any evaluation of any seed."""
    return max(abs(a[1] - b[1]) for s in runs[control]
               for a, b in zip(runs[control][s]["curve"], runs[treatment][s]["curve"]))


def plot(results: dict, path: Path, base_title: str, finetune_title: str, colours: dict[str, str]) -> None:
    """The base's pretraining curve, and every fine-tune's curve coloured by arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(11, 4))
    base = results["base"]["curve"]
    ax0.plot([p[0] for p in base], [p[1] for p in base], "k.-")
    ax0.set(title=base_title, xlabel="step", ylabel="held-out loss", yscale="log")  # step 0 is far above the rest
    for arm, by_seed in results["runs"].items():
        for i, (_, r) in enumerate(sorted(by_seed.items())):
            ax1.plot([p[0] for p in r["curve"]], [p[1] for p in r["curve"]], color=colours[arm], alpha=0.8,
                     lw=1, label=f"{arm} ({len(by_seed)} seeds)" if i == 0 else None)
    ax1.set(title=finetune_title, xlabel="step", ylabel="held-out loss")
    top = max(s["final"]["max"] for arm, s in results["summary"].items() if arm in results["runs"])
    ax1.set_ylim(top=min(ax1.get_ylim()[1], 1.5 * top))
    ax1.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
