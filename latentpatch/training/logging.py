"""Training logs: JSON lines (the record), TensorBoard when installed, and a loss-curve PNG.

Only rank 0 logs. On resume the lines past the resumed step (written by the killed run) are dropped,
so log.jsonl reads as one uninterrupted run.
"""

from __future__ import annotations

import io
import json
import math
import os
import resource
import time
from pathlib import Path
from typing import Any

import torch

from latentpatch.io import atomic_write_bytes, atomic_write_text

LOG_FILE = "log.jsonl"
LOSS_PNG = "loss.png"
PLOT_EVERY_S = 120.0


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak CUDA memory allocated, or the process's peak resident set size on the CPU (MiB)."""
    if device.type == "cuda":
        return {"mem_mib": torch.cuda.max_memory_allocated(device) / 2**20}
    return {"mem_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # Linux reports KiB


def read_log(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a log.jsonl; a half-written last line (a kill mid-write) is skipped."""
    records = []
    try:
        lines = Path(path).read_text().splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def truncate_log(path: str | os.PathLike, after_step: int) -> None:
    """Keep only the records up to `after_step` (the step a resumed run starts from)."""
    path = Path(path)
    if path.exists():
        kept = [r for r in read_log(path) if r.get("step", 0) <= after_step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))


def plot_loss(log_path: str | os.PathLike, png_path: str | os.PathLike) -> bool:
    """Training loss (and its running mean) and, when the run evaluates one, the EMA's held-out loss with its
    best point starred (the checkpoint `sample` loads), against kimg; False when there is nothing to plot yet."""
    records = read_log(log_path)
    train = [r for r in records if "loss" in r and math.isfinite(r["loss"])]
    held = [r for r in records if "heldout_loss" in r and math.isfinite(r["heldout_loss"])]
    if not train and not held:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        x = [r.get("kimg", r["step"]) for r in train]
        y = [r["loss"] for r in train]
        ax.plot(x, y, lw=0.8, alpha=0.5, label="training loss")
        k = max(1, len(y) // 20)
        smooth = [sum(y[max(0, i - k + 1) : i + 1]) / len(y[max(0, i - k + 1) : i + 1]) for i in range(len(y))]
        ax.plot(x, smooth, lw=1.5, label=f"training loss, mean of {k}")
    if held:
        trained = [r for r in held if r["step"] > 0] or held  # step 0 is the curve's start, never the best
        best = min(trained, key=lambda r: r["heldout_loss"])
        ax.plot([r.get("kimg", r["step"]) for r in held], [r["heldout_loss"] for r in held], "o-", ms=2.5, lw=1.2,
                label="held-out loss of the EMA")
        ax.plot([best.get("kimg", best["step"])], [best["heldout_loss"]], "*", ms=12, color="crimson",
                label=f"best {best['heldout_loss']:.4f} at step {best['step']} (what `sample` loads)")
    ax.set_xlabel("kimg (full-size-equivalent images / 1000)")
    ax.set_ylabel("EDM-weighted loss")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    atomic_write_bytes(png_path, buf.getvalue())
    return True


class RunLogger:
    """Appends one JSON line per log step; mirrors scalars to TensorBoard if it is installed."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True, tensorboard: bool = True) -> None:
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._plotted = -float("inf")
        self._tb = None
        if enabled and tensorboard:
            try:  # optional dependency: skip silently when absent
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:
                self._tb = None

    @property
    def log_path(self) -> Path:
        return self.run_dir / LOG_FILE

    def log(self, step: int, **scalars: float) -> None:
        if not self.enabled:
            return
        record = {"step": step, **scalars}
        with open(self.log_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for k, v in scalars.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"train/{k}", v, step)

    def plot(self, force: bool = True) -> None:
        """Redraw loss.png; unless `force`, at most every PLOT_EVERY_S (drawing takes a fraction of a second,
        which a checkpoint every few seconds of a small run would otherwise pay each time)."""
        if self.enabled and (force or time.monotonic() - self._plotted >= PLOT_EVERY_S):
            plot_loss(self.log_path, self.run_dir / LOSS_PNG)
            self._plotted = time.monotonic()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class LogInterval:
    """Running sums between two log lines: images/s and samples/s of the interval."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.nimg, self.samples, self.t0 = 0.0, 0, time.perf_counter()

    def add(self, samples: int, nimg: float) -> None:
        self.nimg += nimg
        self.samples += samples

    def record(self, losses: list[float], **extra: Any) -> dict[str, Any]:
        """The interval's log record: the mean of its steps' `losses`, throughput, `extra`; then a fresh interval."""
        seconds = max(time.perf_counter() - self.t0, 1e-9)
        record = dict(loss=sum(losses) / max(len(losses), 1), img_s=self.nimg / seconds,
                      samples_s=self.samples / seconds, **extra, time=time.time())
        self.reset()
        return record


def progress_postfix(record: dict, heldout: Any = None) -> dict[str, str]:
    """The progress bar's figures: training loss, images/s and, once evaluated, the latest and best held-out loss
    (best as LOSS@STEP) of `heldout` (training.heldout.HeldoutEval, or None)."""
    shown = {"loss": f"{record['loss']:.4f}", "img_s": f"{record['img_s']:.1f}"}
    if heldout is not None and heldout.last_loss is not None:
        shown["held"] = f"{heldout.last_loss:.4f}"
        if heldout.best_step is not None:
            shown["best"] = f"{heldout.best_loss:.4f}@{heldout.best_step}"
    return shown
