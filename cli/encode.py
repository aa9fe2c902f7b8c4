"""`latentpatch encode`: an image folder through an autoencoder into a latent store (resumable, incremental)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command(
        "encode",
        context_settings={"help_option_names": ["-h", "--help"]},
        epilog="Example: latentpatch encode photos/ --vae stabilityai/sd-vae-ft-mse --resolution 256 --out store/ "
        "--flip.  Run it again to resume after a kill or to add new images; only new or changed files are encoded.",
    )
    def encode(
        src: Path = typer.Argument(
            ..., help="Image folder, read recursively (jpg, png, webp, bmp, tiff). Captions: metadata.jsonl or "
            "metadata.csv with file_name and text columns (Hugging Face imagefolder), or a NAME.txt beside NAME.png."
        ),
        vae: str = typer.Option(
            ..., "--vae", help="Autoencoder: 'pixel', 'builtin', a local diffusers VAE folder, or a hub id (cached)."
        ),
        resolution: int = typer.Option(
            ..., "--resolution", help="Training resolution R in pixels (a multiple of the VAE's factor): shorter "
            "side resized to R with antialiasing, then centre-cropped to R x R."
        ),
        out: Path = typer.Option(..., "--out", help="Latent store folder (manifest.json + shards/); created if needed."),
        batch_size: int = typer.Option(32, "--batch-size", help="Images per autoencoder call (a flipped view counts)."),
        device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: cuda when available)."),
        vae_dtype: Optional[str] = typer.Option(
            None, "--vae-dtype", help="Autoencoder compute dtype: float32, bfloat16 or float16 (default: bfloat16 on "
            "CUDA, float32 on CPU)."
        ),
        dtype: str = typer.Option("float16", "--dtype", help="Storage dtype of the latents: float16, bfloat16 or float32."),
        flip: bool = typer.Option(False, "--flip/--no-flip", help="Also store each image mirrored left-right, as a second item."),
        workers: Optional[int] = typer.Option(
            None, "--workers", help="Background processes decoding files (0: decode in this process; default: up to "
            "4, no more than the CPUs available)."
        ),
        store: str = typer.Option(
            "mean-std", "--store", help="mean-std: keep the posterior mean and std so training draws a fresh latent "
            "per read; sample: keep one drawn latent (half the size). Autoencoders without a posterior keep the latent."
        ),
        seed: int = typer.Option(0, "--seed", help="Seed for --store sample; each image's draw depends only on it and the file."),
        upscale_small: bool = typer.Option(
            False, "--upscale-small", help="Upscale images smaller than R instead of skipping them."
        ),
        shard_size: Optional[int] = typer.Option(
            None, "--shard-size", help="Items per shard file (default: 4096, fewer if a shard would pass 256 MiB); "
            "a kill loses at most the shard being filled."
        ),
        rehash: bool = typer.Option(
            False, "--rehash", help="Hash every file again instead of trusting an unchanged size and modification time."
        ),
        text_encoder: Optional[str] = typer.Option(
            None, "--text-encoder", help="Cache caption embeddings for text-conditioned training: an open_clip "
            "MODEL[:PRETRAINED], e.g. ViT-B-32:laion2b_s34b_b79k (a tag or a checkpoint file; MODEL may be a model "
            "config .json). Recorded in the manifest; a rerun keeps the store's encoder. Uncaptioned images get the "
            "empty caption."
        ),
        labels: Optional[str] = typer.Option(
            None, "--labels", help="'folders': store a class label per image, its top-level subfolder (sorted "
            "names -> 0..K-1, recorded as class_names), for class-conditional training (model.num_classes=K)."
        ),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar with images/s."),
    ) -> None:
        """Encode an image folder into a latent store; rerun to resume or to add new images."""
        from latentpatch.encoding.encode import encode as run_encode

        summary = run_encode(
            src, out, vae, resolution, batch_size=batch_size, device=device, vae_dtype=vae_dtype, dtype=dtype,
            flip=flip, workers=workers, store=store, seed=seed, upscale_small=upscale_small, shard_size=shard_size,
            rehash=rehash, progress=progress, text_encoder=text_encoder, labels=labels,
        )
        for line in summary.lines():
            typer.echo(line)
        if text_encoder is not None:
            from latentpatch.data.store import LatentStore

            missing = sum(c is None for c in LatentStore(out).captions)
            if missing:
                typer.echo(f"note: {missing} stored images have no caption; text-conditioned training needs one "
                           "for every image (NAME.txt beside it, or metadata.jsonl)")
