"""`latentpatch sample`: generate images from a trained run into a folder (resumable, torchrun-aware)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from latentpatch.errors import UserError
from latentpatch.sampling.options import DEFAULTS


def register(app: typer.Typer) -> None:
    @app.command(
        "sample",
        context_settings={"help_option_names": ["-h", "--help"]},
        epilog="Example: latentpatch sample runs/demo --n 64 --out samples/ --class 3 --guidance 2.  Another shape: "
        "--size 96x64 (W x H).  A prompts "
        "file: --prompts prompts.jsonl --n 4.  Many GPUs: torchrun --nproc_per_node 8 -m latentpatch.cli sample ...",
    )
    def sample(
        run: Path = typer.Argument(..., help="Run folder written by `latentpatch train` (config.yaml, run.json, checkpoints/)."),
        n: int = typer.Option(..., "--n", help="Images per prompt or class; images in all when neither is given."),
        out: Path = typer.Option(..., "--out", help="Output folder: NNNNNNNN.png, images.jsonl, grid.png, job.json. Rerun into it to resume."),
        prompt: Optional[str] = typer.Option(None, "--prompt", help="One text prompt (text-conditioned models only)."),
        prompts: Optional[Path] = typer.Option(None, "--prompts", help='Prompts file: one prompt a line, or JSONL with "prompt" and optional "count".'),
        class_label: Optional[int] = typer.Option(None, "--class", help="Class label 0..K-1 (class-conditional models; default: a random class per image)."),
        steps: int = typer.Option(DEFAULTS.steps, "--steps", help="Noise levels of the Karras schedule (Heun uses 2*steps-1 network calls)."),
        guidance: float = typer.Option(DEFAULTS.guidance, "--guidance", help="Classifier-free guidance scale: 1 = none, 0 = unconditional, >1 = stronger."),
        seed: int = typer.Option(DEFAULTS.seed, "--seed", help="Job seed; image i uses a generator seeded by (seed, i), whatever the batch size."),
        batch_size: int = typer.Option(DEFAULTS.batch_size, "--batch-size", help="Images per network batch (does not change the images)."),
        size: Optional[str] = typer.Option(None, "--size", help="Image size in pixels, WxH (width first, e.g. 64x32) or N for N x N; default: the run's training shape. Each side a multiple of the autoencoder's factor x the network's size multiple (DiT patch size, UNet downsampling); lp.sample takes size=(H, W), height first."),
        sampler: str = typer.Option(DEFAULTS.sampler, "--sampler", help="heun (EDM, 2nd order), euler, or dpmpp_2m (DPM-Solver++ 2M)."),
        churn: float = typer.Option(DEFAULTS.churn, "--churn", help="EDM stochastic churn S_churn (0 = deterministic ODE; heun/euler only)."),
        weights: str = typer.Option("ema", "--weights", help="ema (the averaged weights) or raw (the trained weights)."),
        device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: cuda when available; under torchrun each rank's GPU)."),
        checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="best (the lowest held-out loss; the default, or the latest when the run had no held-out evaluation), latest, a checkpoint folder, a name (step-00001000) or a step number."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar with images/s."),
    ) -> None:
        """Sample images from a run at full size (EDM Heun by default), decode them and write PNGs + settings."""
        from latentpatch.distributed import is_main_process
        from latentpatch.sampling.generate import generate
        from latentpatch.sampling.options import SampleOptions
        from latentpatch.sampling.prompts import read_prompts
        from latentpatch.sampling.shape import parse_size

        if prompt is not None and prompts is not None:
            raise UserError("give --prompt or --prompts, not both")
        options = SampleOptions(steps=steps, sampler=sampler, guidance=guidance, churn=churn, seed=seed,
                                batch_size=batch_size, size=None if size is None else parse_size(size))
        entries = read_prompts(prompts, n) if prompts is not None else None
        result = generate(run, n, options, prompts=entries if prompt is None else [prompt], class_labels=class_label,
                          weights=weights, checkpoint=checkpoint, device=device, out=out, output="none",
                          progress=progress)
        if is_main_process():
            typer.echo(
                f"{result.total} images in {result.out} ({result.skipped} were there already, "
                f"{result.written} new here at {result.images_per_s:.2f} images/s)"
            )
