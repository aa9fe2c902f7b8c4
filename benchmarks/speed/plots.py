"""The figures of speed to quality: held-out loss against training seconds (all noise levels, and a panel per
noise level), and the arms' sample grids side by side."""

from __future__ import annotations

import math
import statistics
import textwrap
from pathlib import Path

from .report import SigmaCurve

CHARS_PER_INCH = 13  # of a 9-point title: lines wrapped to the figure's width instead of cut at its edges


def wrapped(title: str, inches: float) -> str:
    """`title` with each of its lines wrapped to fit a figure `inches` wide."""
    width = max(20, int(inches * CHARS_PER_INCH))
    return "\n".join(textwrap.fill(line, width) for line in title.split("\n"))


def plot_sigma_curves(per_sigma: dict[str, dict[int, SigmaCurve]], sigmas: list[float], path: Path,
                      title: str) -> None:
    """A panel per noise level: each arm's held-out loss at that sigma against training seconds (seed lines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(4, len(sigmas))
    rows = math.ceil(len(sigmas) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.4 * cols, 2.8 * rows), dpi=110, squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (ax, sigma) in enumerate(zip(axes.flat, sigmas)):
        values = []
        for a, (arm, by_seed) in enumerate(per_sigma.items()):
            for j, (_, curve) in enumerate(sorted(by_seed.items())):
                ys = [losses[k] for _, losses in curve]
                values += ys
                ax.plot([t for t, _ in curve], ys, color=colours[a % len(colours)], lw=1.2 if j == 0 else 0.8,
                        alpha=1.0 if j == 0 else 0.55, label=arm if j == 0 and k == 0 else None)
        if values:
            low, mid = min(values), statistics.median(values)
            ax.set_ylim(low - 0.02 * abs(low), min(max(values), low + 4 * (mid - low) + 1e-3))
        ax.set_title(f"σ = {sigma:.3g}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[len(sigmas):]:
        ax.axis("off")
    fig.legend(fontsize=7, loc="lower center", ncol=min(len(per_sigma), 4))
    fig.suptitle(wrapped(f"{title}\nheld-out loss per noise level against each run's own training seconds",
                         3.4 * cols), fontsize=9)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def plot_curves(curves: dict[str, dict[int, list[tuple[float, float]]]], path: Path, title: str,
                xlabel: str = "training seconds (each run's own: process CPU time of its steps, 1 thread)") -> None:
    """All arms on one plot: held-out loss against training seconds, one line per seed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=110)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, (arm, by_seed) in enumerate(curves.items()):
        for j, (seed, curve) in enumerate(sorted(by_seed.items())):
            ax.plot([t for t, _ in curve], [loss for _, loss in curve], color=colours[k % len(colours)],
                    lw=1.4 if j == 0 else 0.9, alpha=1.0 if j == 0 else 0.6, label=arm if j == 0 else None)
    ax.set_xlabel(xlabel)
    ax.set_ylabel("held-out EDM-weighted loss of the EMA")
    ax.set_title(wrapped(title, 8), fontsize=9)
    losses = [loss for by_seed in curves.values() for c in by_seed.values() for _, loss in c]
    low = min(losses)
    ax.set_ylim(low - 0.02 * abs(low), min(max(losses), low + 4 * (statistics.median(losses) - low) + 1e-3))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def grid_figure(grids: dict[str, Path], path: Path, title: str) -> None:
    """The arms' sample grids side by side, each under its name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    fig, axes = plt.subplots(1, len(grids), figsize=(3.2 * len(grids), 3.6), dpi=110, squeeze=False)
    for ax, (arm, grid) in zip(axes[0], grids.items()):
        with Image.open(grid) as im:
            ax.imshow(im.convert("RGB"))
        ax.set_title(arm, fontsize=9)
        ax.axis("off")
    fig.suptitle(wrapped(title, 3.2 * len(grids)), fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
