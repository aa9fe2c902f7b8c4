"""`latentpatch demo`: encode, patch-train and sample on a built-in default, then say where to go next."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command(
        "demo",
        help="Run the whole pipeline on a built-in default (no GPU, no network, a few minutes): scikit-image "
        "pictures -> shipped VAE -> text-conditioned patch DiT -> samples.png. Rerun to resume.",
    )
    def demo(
        out: Path = typer.Option(Path("latentpatch-demo"), "--out", help="Folder for images, latents, run and PNGs."),
        steps: int = typer.Option(1200, "--steps", min=1, help="Training steps (fewer is faster and blurrier)."),
        per_caption: int = typer.Option(64, "--per-caption", min=1, help="Training crops per caption."),
        samples: int = typer.Option(8, "--samples", min=1, help="Images sampled per prompt."),
        device: str = typer.Option(None, "--device", help="cpu or cuda (default: cuda when available)."),
        seed: int = typer.Option(0, "--seed", help="Seed for data, training and sampling."),
        quick: bool = typer.Option(False, "--quick", help="A shortened run (for smoke tests): 40 steps, 8 crops."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
        text_encoder: str = typer.Option(
            "ViT-B-32", "--text-encoder",
            help="open_clip MODEL[:PRETRAINED] or a model config .json; without a tag the weights are random "
            "(nothing is downloaded), which is enough to tell the demo's four captions apart.",
        ),
    ) -> None:
        from latentpatch.demo.run import DemoOptions, run_demo

        opts = DemoOptions(out=out, steps=steps, per_caption=per_caption, samples_per_prompt=samples,
                           device=device, seed=seed, progress=progress,
                           text_encoder=text_encoder)
        if quick:
            opts.steps, opts.per_caption, opts.samples_per_prompt, opts.sample_steps = 40, 8, 2, 6
        res = run_demo(opts, log=typer.echo)
        typer.echo(f"\ndone in {res.seconds / 60:.1f} min")
        typer.echo(f"  samples (a row per prompt: {', '.join(res.prompts)}): {res.samples}")
        typer.echo(f"  loss curve: {res.loss_curve}")
        typer.echo(f"  run folder (config, checkpoints, log.jsonl): {res.run}")
        typer.echo("\nnext, with your own images:")
        typer.echo("  latentpatch encode my_images/ --vae stabilityai/sd-vae-ft-mse --resolution 256 --out my_latents")
        typer.echo("  latentpatch train --latents my_latents --config patch-latent --out runs/mine")
        typer.echo("  latentpatch sample runs/mine --n 64 --out samples/")
