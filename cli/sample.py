"""`latentpatch sample`: generate images from a trained run into a folder (resumable, torchrun-aware)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from latentpatch.errors import UserError
from latentpatch.sampling.options import SampleOptions

from .options import with_sample_options


def register(app: typer.Typer) -> None:
    @app.command(
        "sample",
        context_settings={"help_option_names": ["-h", "--help"]},
        epilog="Example: latentpatch sample runs/demo --n 64 --out samples/ --class 3 --guidance 2.  Another shape: "
        "--size 96x64 (W x H).  A prompts "
        "file: --prompts prompts.jsonl --n 4.  Many GPUs: torchrun --nproc_per_node 8 -m latentpatch.cli sample ...",
    )
    @with_sample_options
    def sample(
        run: Path = typer.Argument(..., help="Run folder written by `latentpatch train` (config.yaml, run.json, checkpoints/)."),
        n: int = typer.Option(..., "--n", help="Images per prompt or class; images in all when neither is given."),
        out: Path = typer.Option(..., "--out", help="Output folder: NNNNNNNN.png, images.jsonl, grid.png, job.json. Rerun into it to resume."),
        prompt: Optional[str] = typer.Option(None, "--prompt", help="One text prompt (text-conditioned models only)."),
        prompts: Optional[Path] = typer.Option(None, "--prompts", help='Prompts file: one prompt a line, or JSONL with "prompt" and optional "count".'),
        class_label: Optional[int] = typer.Option(None, "--class", help="Class label 0..K-1 (class-conditional models; default: a random class per image)."),
        weights: str = typer.Option("ema", "--weights", help="ema (the averaged weights) or raw (the trained weights)."),
        device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: cuda when available; under torchrun each rank's GPU)."),
        checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="best (the lowest held-out loss; the default, or the latest when the run had no held-out evaluation), latest, a checkpoint folder, a name (step-00001000) or a step number."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar with images/s."),
        options: SampleOptions = None,
    ) -> None:
        """Sample images from a run at full size (EDM Heun by default), decode them and write PNGs + settings."""
        from latentpatch.distributed import is_main_process
        from latentpatch.sampling.generate import sample as run_sample
        from latentpatch.sampling.prompts import read_prompts

        if prompt is not None and prompts is not None:
            raise UserError("give --prompt or --prompts, not both")
        entries = read_prompts(prompts, n) if prompts is not None else None
        result = run_sample(run, n, options=options, prompts=entries if prompt is None else [prompt],
                            class_labels=class_label, weights=weights, checkpoint=checkpoint, device=device, out=out,
                            output="none", progress=progress)
        if is_main_process():
            typer.echo(
                f"{result.total} images in {result.out} ({result.skipped} were there already, "
                f"{result.written} new here at {result.images_per_s:.2f} images/s)"
            )
