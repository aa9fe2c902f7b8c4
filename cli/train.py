"""`latentpatch train`: patch-wise EDM training on a latent store into a run folder (resumable, torchrun-aware)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import List, Optional

import typer

from latentpatch.data.buckets import MAX_ASPECT


def register(app: typer.Typer) -> None:
    @app.command(
        "train",
        context_settings={"help_option_names": ["-h", "--help"]},
        epilog="Example: latentpatch train --latents store/ --config tiny --out runs/demo train.max_steps=100 "
        "optim.lr=3e-4.  Fine-tune: latentpatch train --base runs/demo --data my_images/ --out runs/ft "
        "--max-steps 2000.  On a small store (up to 5000 source images) a share is held out and evaluated, the "
        "best checkpoint kept and the run stopped early by default (heldout.share=0 turns it off).  "
        "Many GPUs: torchrun --nproc_per_node 8 -m latentpatch.cli train ...",
    )
    def train(
        latents: Optional[Path] = typer.Option(
            None, "--latents", help="Latent store folder written by `latentpatch encode` (manifest.json + shards/). "
            "With --base it may also be an image folder (same as --data)."),
        out: Path = typer.Option(..., "--out", help="Run folder: config.yaml, run.json, checkpoints/, log.jsonl, loss.png, samples/."),
        config: Optional[str] = typer.Option(
            None, "--config",
            help="Built-in preset name (patch-latent: the recommended recipe on DiT-S/2; full-size: the plain baseline; "
            "dit-b2, patch-pixel, unet-small, tiny, demo) or a YAML "
            "file. Needed for a new run; with --resume the run's own config is used, and a different one is refused.",
        ),
        resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its latest checkpoint, exactly (same batches, same result)."),
        max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Stop after this many optimisation steps in all (overrides train.max_steps; may change on --resume)."),
        device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: cuda when available; under torchrun each rank's GPU)."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar with loss and images/s (rank 0 only)."),
        base: Optional[str] = typer.Option(
            None, "--base", help="Fine-tune instead of starting from random weights: a latentpatch run folder, or a "
            "pretrained diffusers model: a pipeline folder or hub id (Stable Diffusion 1.x/2.x, DiT-XL/2: unet/ or "
            "transformer/, scheduler/, vae/, text_encoder/) or a bare UNet2DModel/UNet2DConditionModel/"
            "DiTTransformer2DModel folder. Its input gains zero-initialised coordinate channels and a pipeline keeps "
            "its own preconditioning (its scheduler's schedule and prediction type), so the first step starts "
            "exactly from the pretrained denoiser. --max-steps is the number of fine-tuning steps (default 1000)."),
        data: Optional[Path] = typer.Option(
            None, "--data", help="With --base: an image folder (captions in NAME.txt or metadata.jsonl; encoded into "
            "OUT/latents with the base's autoencoder) or a latent store."),
        base_weights: str = typer.Option("ema", "--base-weights", help="With a run as --base: start from its ema or raw weights."),
        text_encoder: Optional[str] = typer.Option(
            None, "--text-encoder", help="With --base: the open_clip MODEL[:PRETRAINED], or transformers:PIPELINE, for "
            "captions (default: the base run's; for a pipeline its own text encoder with the transformers extra, else "
            "the open_clip tower SD used: ViT-L-14-quickgelu:openai for 1.x, ViT-H-14:laion2b_s32b_b79k penultimate "
            "for 2.x). A pretrained UNet2DConditionModel needs one of its cross_attention_dim width."),
        vae: Optional[str] = typer.Option(None, "--vae", help="With --base and an image folder: the autoencoder (default: the base run's, or the pipeline's vae/)."),
        resolution: Optional[int] = typer.Option(None, "--resolution", help="With --base and an image folder: pixel size to encode at (default: the base run's, or the pipeline network's own size)."),
        buckets: bool = typer.Option(False, "--buckets", help="With --base and an image folder: keep each image's aspect ratio: encode it into the aspect bucket nearest its shape, of about --resolution squared pixels (as `encode --buckets`)."),
        bucket_step: Optional[int] = typer.Option(None, "--bucket-step", help="With --buckets: bucket sides are multiples of this many pixels (default: the autoencoder's factor x 2, or x the base network's size multiple where that is larger: a UNet's downsampling, e.g. 32 px for SDXL)."),
        max_aspect: float = typer.Option(MAX_ASPECT, "--max-aspect", help="With --buckets: the longest bucket side over the shortest, at most (a finite number >= 1)."),
        lora_rank: int = typer.Option(0, "--lora-rank", help="With --base: train rank-r LoRA adapters on the attention projections only (0 = all weights)."),
        overrides: Optional[List[str]] = typer.Argument(
            None, help="Config overrides as section.key=value, e.g. train.batch_size=32 patches.real_p=0.25 (values are YAML)."
        ),
    ) -> None:
        """Train a denoiser on a latent store with the Patch Diffusion schedule, EDM loss, AdamW and EMA (or fine-tune one: --base)."""
        from latentpatch.config import load_config
        from latentpatch.distributed import is_main_process
        from latentpatch.errors import UserError
        from latentpatch.training.trainer import train as run_train

        if base is not None:
            from latentpatch.finetuning.finetune import finetune

            source = data or latents
            if source is None:
                raise UserError("--base needs --data: an image folder or a latent store to fine-tune on")
            result = finetune(base, source, out, steps=max_steps or 1000, weights=base_weights,
                              text_encoder=text_encoder, vae=vae, resolution=resolution, lora_rank=lora_rank,
                              buckets=buckets, bucket_step=bucket_step, max_aspect=max_aspect,
                              config=config, overrides=overrides or [], resume=resume, device=device,
                              progress=progress)
            if is_main_process():
                loss = "n/a" if result.loss is None else f"{result.loss:.4f}"
                typer.echo(f"fine-tuned to step {result.step} (loss {loss}) in {result.seconds:.0f} s; "
                           f"latest checkpoint {result.checkpoint}")
                if result.summary:
                    typer.echo(result.summary)
            return
        if latents is None:
            raise UserError("--latents is needed: the latent store to train on (or --base with --data to fine-tune)")
        if config is None and overrides:
            raise UserError("config overrides need --config (a resumed run keeps its own config)")
        cfg = load_config(config, overrides or []) if config is not None else None
        if cfg is None and not resume:
            raise UserError("--config is needed to start a new run (a preset name such as tiny, or a YAML file)")
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*nothing to train")  # said below, in the CLI's words
            result = run_train(cfg, latents, out, resume=resume, max_steps=max_steps, device=device,
                               progress=progress)
        if is_main_process() and result.trained == 0 and result.stopped_early:
            typer.echo(f"nothing to train: run {out} stopped early at step {result.step}. {result.summary()}")
        elif is_main_process() and result.trained == 0:
            typer.echo(f"nothing to train: run {out} is already at step {result.step} (train.max_steps); pass a "
                       "larger --max-steps to continue it")
        elif is_main_process():
            loss = "n/a" if result.loss is None else f"{result.loss:.4f}"
            typer.echo(f"trained to step {result.step} ({result.kimg:.1f} kimg, loss {loss}) in {result.seconds:.0f} s; "
                       f"latest checkpoint {result.checkpoint}")
            if result.summary():
                typer.echo(result.summary())
