"""`latentpatch export`: a run as a diffusers pipeline folder (DiffusionPipeline.from_pretrained(OUT,
trust_remote_code=True); a stock DiT fine-tune: DiTPipeline.from_pretrained(OUT))."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command(
        "export",
        context_settings={"help_option_names": ["-h", "--help"]},
        epilog="Examples: latentpatch export runs/faces export/faces.  latentpatch export runs/sd15-lora out/ --lora "
        "merged --checkpoint latest.  Then in Python: DiffusionPipeline.from_pretrained('export/faces', "
        "trust_remote_code=True)(num_inference_steps=18).",
    )
    def export(
        run: Path = typer.Argument(..., help="Run folder written by `latentpatch train` (config.yaml, run.json, checkpoints/)."),
        out: Path = typer.Argument(..., help="The pipeline folder to write (model_index.json, the network, scheduler/, vae/, text encoder, README.md)."),
        checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="BEST (the lowest held-out loss; the default, or the latest when the run had no held-out evaluation), latest, a step number, a checkpoint name or folder (a post-hoc EMA folder of `latentpatch ema`)."),
        lora: Optional[str] = typer.Option(None, "--lora", help="LoRA runs: separate (a LoRA file for pipe.load_lora_weights beside the base weights; the default for a UNet2DConditionModel) or merged (the adapters folded into the weights; the default, and the only choice, for a DiT or a UNet2DModel)."),
        sampler: Optional[str] = typer.Option(None, "--sampler", help="Which sampler the folder's scheduler steps as: heun (EDM, 2nd order; the default), euler, or dpmpp_2m (runs trained from scratch). A DiT fine-tune exported to the stock DiTPipeline: euler (DDIMScheduler, the default) or dpmpp_2m (DPMSolverMultistepScheduler)."),
        weights: str = typer.Option("ema", "--weights", help="ema (the averaged weights) or raw (the trained weights)."),
        force: bool = typer.Option(False, "--force", help="Replace OUT if it exists."),
    ) -> None:
        """Export a run's checkpoint as a diffusers pipeline folder that generates what `latentpatch sample` does."""
        from latentpatch.exporting.exporter import export as export_run

        folder = export_run(run, out, checkpoint=checkpoint, lora=lora, sampler=sampler, weights=weights,
                            force=force)
        record = json.loads((folder / "export.json").read_text())
        ck = record["checkpoint"]
        typer.echo(f"{folder}: {record['network']} + {record['scheduler']} from {ck['name']} ({ck['which']}, step "
                   f"{ck['step']}){'; LoRA ' + record['lora'] if record['lora'] else ''}. Load it with "
                   f"{record['load'][1].format(folder=folder)}")
