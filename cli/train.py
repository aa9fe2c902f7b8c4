"""`latentpatch train`: patch-wise EDM training on a latent store into a run folder (resumable, torchrun-aware)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command(
        "train",
        context_settings={"help_option_names": ["-h", "--help"]},
        epilog="Example: latentpatch train --latents store/ --config tiny --out runs/demo train.max_steps=100 "
        "optim.lr=3e-4.  Many GPUs: torchrun --nproc_per_node 8 -m latentpatch.cli train ...",
    )
    def train(
        latents: Path = typer.Option(..., "--latents", help="Latent store folder written by `latentpatch encode` (manifest.json + shards/)."),
        out: Path = typer.Option(..., "--out", help="Run folder: config.yaml, run.json, checkpoints/, log.jsonl, loss.png, samples/."),
        config: Optional[str] = typer.Option(
            None, "--config",
            help="Built-in preset name (tiny, dit-s2, dit-b2, unet-small, patch-latent, patch-pixel, full-size) or a YAML "
            "file. Needed for a new run; with --resume the run's own config is used, and a different one is refused.",
        ),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its latest checkpoint, exactly (same batches, same result)."),
        max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many optimisation steps in all (overrides train.max_steps; may change on --resume)."),
        device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: cuda when available; under torchrun each rank's GPU)."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar with loss and images/s (rank 0 only)."),
        overrides: Optional[List[str]] = typer.Argument(
            None, help="Config overrides as section.key=value, e.g. train.batch_size=32 patches.real_p=0.25 (values are YAML)."
        ),
    ) -> None:
        """Train a denoiser on a latent store with the Patch Diffusion schedule, EDM loss, AdamW and EMA."""
        from latentpatch.config import load_config
        from latentpatch.errors import UserError
        from latentpatch.training.trainer import train as run_train

        if config is None and overrides:
            raise UserError("config overrides need --config (a resumed run keeps its own config)")
        cfg = load_config(config, overrides or []) if config is not None else None
        if cfg is None and not resume:
            raise UserError("--config is needed to start a new run (a preset name such as tiny, or a YAML file)")
        result = run_train(cfg, latents, out, resume=resume, max_steps=max_steps, device=device, progress=progress)
        if os.environ.get("RANK", "0") == "0":
            loss = "n/a" if result.loss is None else f"{result.loss:.4f}"
            typer.echo(f"trained to step {result.step} ({result.kimg:.1f} kimg, loss {loss}) in {result.seconds:.0f} s; "
                       f"latest checkpoint {result.checkpoint}")
