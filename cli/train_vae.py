"""`latentpatch train-vae`: train a small KL autoencoder (or fine-tune one) into a diffusers VAE folder."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command(
        "train-vae",
        context_settings={"help_option_names": ["-h", "--help"]},
        epilog="Examples: latentpatch train-vae --out my-vae (the defaults are the builtin VAE's recipe, about an hour on "
        "2 CPU cores; --steps 1500 gives a usable VAE in 10 minutes).  Adapt the builtin VAE's decoder to your own images: "
        "latentpatch train-vae --out med-vae --data scans/ --init builtin --train decoder --steps 1000.  The held-out check "
        "on scikit-learn's sample photographs needs pip install 'latentpatch\\[vae]' (or --no-reference-check).",
    )
    def train_vae(
        out: Path = typer.Option(..., "--out", help="Output diffusers VAE folder: config.json, fp16 safetensors, README.md, "
                                 "train_vae_report.json, and training/state.safetensors for --resume."),
        data: Optional[Path] = typer.Option(
            None, "--data", help="Image folder read recursively (jpg, png, webp, bmp, tiff; greyscale and alpha made RGB). "
            "Default: the photographs and textures bundled with scikit-image."
        ),
        init: Optional[str] = typer.Option(
            None, "--init", help="Fine-tune this AutoencoderKL ('builtin', a diffusers folder or a cached hub id) instead "
            "of a new model; its architecture is kept and --channels/--layers-per-block/--norm-groups are ignored."
        ),
        train: str = typer.Option(
            "all", "--train", help="all: train every weight; decoder: freeze the encoder so latents (and latent stores, "
            "and the scaling factor) stay exactly as they were, and only sharpen the decoding."
        ),
        steps: int = typer.Option(9000, "--steps", help="Optimisation steps in all; with --resume it may be raised (the cosine decay then stretches to the new total)."),
        batch_size: int = typer.Option(16, "--batch-size", help="Crops per step."),
        crop: int = typer.Option(32, "--crop", help="Side of the square training crops, in pixels (a multiple of the "
                                 "VAE's factor)."),
        eval_crop: Optional[int] = typer.Option(
            None, "--eval-crop", help="Side of the held-out crops PSNR/SSIM are measured on (default: the larger of --crop and 64)."
        ),
        lr: float = typer.Option(5e-4, "--lr", help="Adam peak learning rate (after warm-up, then cosine decay to 1%); "
                                 "1e-3 and above leave flat saturated colours grey."),
        seed: int = typer.Option(0, "--seed", help="Seed of the model's initialisation, the crops and the latent noise."),
        device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: cuda when available)."),
        holdout: int = typer.Option(
            3, "--holdout", help="Images kept out of training to measure PSNR/SSIM on (for the default data: coffee, "
            "camera, gravel, ... in that order; for --data a seeded choice)."
        ),
        channels: str = typer.Option(
            "32,64,64", "--channels", help="block_out_channels of a new model, comma-separated; n widths give "
            "factor 2^(n-1) (3 widths: factor 4)."
        ),
        layers_per_block: int = typer.Option(1, "--layers-per-block", help="ResNet layers per encoder block (decoder: one more)."),
        norm_groups: int = typer.Option(8, "--norm-groups", help="GroupNorm groups; must divide every width in --channels."),
        latent_channels: int = typer.Option(4, "--latent-channels", help="Channels of the latent of a new model."),
        mse_weight: float = typer.Option(0.5, "--mse-weight", help="Weight of the MSE term (the loss is L1 + this * MSE + ...)."),
        edge_weight: float = typer.Option(0.0, "--edge-weight", help="Weight of an L1 term on Sobel image gradients; 0.1 "
                                          "(the old default) cost held-out PSNR and flat-colour fidelity."),
        kl_weight: float = typer.Option(1e-6, "--kl-weight", help="Weight of the KL term per latent element."),
        colour_jitter: float = typer.Option(
            0.5, "--colour-jitter", help="Fraction of crops recoloured: a colour crop turned by a random hue angle (whole "
            "circle) with a random saturation factor, a greyscale one painted through a gradient map between two random "
            "colours. 0 turns it off (e.g. for --train decoder on images whose exact colours are the point)."
        ),
        saturation: str = typer.Option("0.5,2", "--saturation", help="low,high range of the saturation factor "
                                       "(log-uniform) of --colour-jitter."),
        colour_fields: float = typer.Option(0.5, "--colour-fields", help="Fraction of crops replaced by flat or smooth "
                                            "random colour fields."),
        reference_check: bool = typer.Option(
            True, "--reference-check/--no-reference-check", help="Also measure PSNR/SSIM on 64 px crops of "
            "scikit-learn's two sample photographs (china, flower; never trained on). Needs scikit-learn: "
            "pip install 'latentpatch\\[vae]'."
        ),
        eval_every: int = typer.Option(250, "--eval-every", help="Measure held-out PSNR/SSIM every N steps."),
        checkpoint_every: int = typer.Option(250, "--checkpoint-every", help="Save the resumable training state every N steps."),
        resume: bool = typer.Option(False, "--resume", help="Continue from --out's training/state.safetensors (same recipe)."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar with loss and PSNR."),
    ) -> None:
        """Train a KL autoencoder on random crops (L1 + MSE + edge + KL losses) and save a diffusers VAE folder
        whose scaling_factor is measured on the data; prints held-out PSNR and SSIM."""
        from latentpatch.autoencoders.vae_training.train import REPORT_NAME, VAETrainConfig
        from latentpatch.autoencoders.vae_training.train import train_vae as run_train_vae
        from latentpatch.errors import UserError

        try:
            widths = tuple(int(c) for c in channels.split(","))
        except ValueError as e:
            raise UserError(f"--channels {channels!r} must be comma-separated integers, e.g. 16,32,64") from e
        try:
            sat = tuple(float(f) for f in saturation.split(","))
        except ValueError as e:
            raise UserError(f"--saturation {saturation!r} must be two comma-separated numbers, e.g. 0.5,2") from e
        cfg = VAETrainConfig(
            out=out, data=data, init=init, train=train, steps=steps, batch_size=batch_size, crop=crop, eval_crop=eval_crop, lr=lr,
            seed=seed, device=device, holdout=holdout, channels=widths, layers_per_block=layers_per_block,
            norm_groups=norm_groups, latent_channels=latent_channels, mse_weight=mse_weight, edge_weight=edge_weight,
            kl_weight=kl_weight, colour_jitter=colour_jitter, saturation=sat, colour_fields=colour_fields,
            reference_check=reference_check, eval_every=eval_every,
            checkpoint_every=checkpoint_every, resume=resume, progress=progress,
        )
        command = shlex.join(["latentpatch", *sys.argv[1:]])
        result = run_train_vae(cfg, command=command)
        if result.heldout_psnr is not None:
            typer.echo(f"held-out PSNR {result.heldout_psnr:.2f} dB, SSIM {result.heldout_ssim:.4f} "
                       f"({cfg.eval_crops} held-out crops of {cfg.eval_crop} px)")
        ref, colour = result.report.get("reference"), result.report["colour_check"]
        if ref is not None:
            typer.echo(f"reference photographs (china, flower): PSNR {ref['psnr']:.2f} dB, SSIM {ref['ssim']:.4f}")
        typer.echo(f"flat colours ({colour['fields']} fields): worst channel error {colour['worst_channel_error']:.3f}, "
                   f"mean {sum(colour['mean']) / 3:.3f}, mean ΔE {colour['delta_e_mean']:.2f}")
        typer.echo(f"scaling_factor {result.scaling_factor:.6f}; saved {out} in {result.seconds / 60:.1f} min "
                   f"(report: {out / REPORT_NAME})")
