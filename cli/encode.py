"""`latentpatch encode`: an image folder through an autoencoder into a latent store (resumable, incremental).

The options are not spelled here: each is a field of `EncodeOptions` (name, default, help, check), and the
command's signature is built from them."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import typer


def register(app: typer.Typer) -> None:
    from latentpatch.encoding.options import cli_parameters

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
            "side resized to R with antialiasing, then centre-cropped to R x R. With --buckets: the side of the "
            "buckets' area R x R (a multiple of --bucket-step)."
        ),
        out: Path = typer.Option(..., "--out", help="Latent store folder (manifest.json + shards/); created if needed."),
        **options: Any,
    ) -> None:
        """Encode an image folder into a latent store; rerun to resume or to add new images."""
        from latentpatch.encoding.encode import encode_store
        from latentpatch.encoding.options import EncodeOptions

        opts = EncodeOptions(**options)
        summary = encode_store(src, out, vae, resolution, opts)
        for line in summary.lines():
            typer.echo(line)
        if opts.text_encoder is not None:
            from latentpatch.data.store import LatentStore

            missing = sum(c is None for c in LatentStore(out).captions)
            if missing:
                typer.echo(f"note: {missing} stored images have no caption; text-conditioned training needs one "
                           "for every image (NAME.txt beside it, or metadata.jsonl)")

    named = [p for p in inspect.signature(encode).parameters.values() if p.kind != p.VAR_KEYWORD]
    encode.__signature__ = inspect.Signature([*named, *cli_parameters()])
    app.command(
        "encode",
        context_settings={"help_option_names": ["-h", "--help"]},
        epilog="Example: latentpatch encode photos/ --vae stabilityai/sd-vae-ft-mse --resolution 256 --out store/ "
        "--flip.  Run it again to resume after a kill or to add new images; only new or changed files are encoded.",
    )(encode)
