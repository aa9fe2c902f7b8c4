"""`lp.export` / `latentpatch export RUN OUT`: a run's checkpoint as a diffusers pipeline folder.

    pipe = DiffusionPipeline.from_pretrained(OUT, trust_remote_code=True)   # a stock DiT: DiTPipeline.from_pretrained(OUT)

The checkpoint is the one `latentpatch sample` would load (BEST when the run kept one, else the latest) or
the one named; the folder is written beside OUT and replaces it only when complete (an existing OUT only
with force); README.md and export.json say what it is.
"""

from __future__ import annotations

import os
from pathlib import Path

from latentpatch.errors import UserError
from latentpatch.exporting import coordinate_pipeline, dit_pipeline, stock_flow_pipeline, stock_sdxl_pipeline
from latentpatch.exporting.folder import check_out, staged
from latentpatch.exporting.lora import lora_mode
from latentpatch.exporting.model_card import export_record, write_model_card
from latentpatch.sampling.options import DEFAULTS

# The folder kinds, first match wins: each module has serves(loaded) and write(loaded, folder, sampler, lora), and
# may have check(loaded), which refuses a run it serves but cannot export before anything is written. A
# base whose weights stay stock (DiT-XL/2, SDXL, SD3, FLUX: positions in its own language, no coordinate
# channels) gets a module writing its stock pipeline, placed before the coordinate pipeline, which serves every run
# with channels.
TARGETS = (dit_pipeline, stock_flow_pipeline, stock_sdxl_pipeline, coordinate_pipeline)


def _checkpoint(checkpoint: str | int | os.PathLike | None) -> str | int | os.PathLike | None:
    """BEST / LATEST spelt as the pointer files are, read as `best` / `latest`."""
    if isinstance(checkpoint, str) and checkpoint.lower() in ("best", "latest"):
        return checkpoint.lower()
    return checkpoint


def export(
    run: str | os.PathLike, out: str | os.PathLike, *, checkpoint: str | int | os.PathLike | None = None,
    lora: str | None = None, sampler: str | None = None, weights: str = "ema", force: bool = False,
) -> Path:
    """Write run `run`'s network, scheduler, autoencoder and text encoder to `out` as a diffusers pipeline.

    checkpoint: None (BEST, else the latest), "best", "latest", a step, a checkpoint name or folder (a post-hoc
    EMA folder of `latentpatch ema`). lora (LoRA runs): "separate" (a LoRA file beside the base weights; the
    default for a UNet2DConditionModel) or "merged" (the default for every other network). sampler: which of
    latentpatch's samplers the folder's scheduler takes the steps of ("heun", "euler"; "dpmpp_2m" for EDM runs;
    a stock DiT fine-tune in DiTPipeline: "euler" as DDIMScheduler or "dpmpp_2m"); None: heun, or for DiTPipeline
    euler (DDIM, the scheduler DiT-XL/2 ships). force: replace an existing `out`.

        >>> latentpatch.export("runs/faces", "export/faces")
    """
    from latentpatch.diffusion.samplers import get_sampler
    from latentpatch.runs import check_format_version, load_run, read_run_info

    run, out = Path(run), Path(out)
    check_out(out, run, force)
    if sampler is not None:
        get_sampler(sampler)
    if not (run / "run.json").is_file():
        raise UserError(f"{run} is not a latentpatch run folder: run.json is missing")
    check_format_version(read_run_info(run), run)
    loaded = load_run(run, weights=weights, checkpoint=_checkpoint(checkpoint), device="cpu")
    mode = lora_mode(loaded.cfg.model.lora_rank, loaded.precond.net, lora)
    target = next(t for t in TARGETS if t.serves(loaded))
    if hasattr(target, "check"):
        target.check(loaded)
    sampler = sampler or getattr(target, "DEFAULT_SAMPLER", DEFAULTS.sampler)  # DiTPipeline's: euler (DDIM)
    with staged(out) as folder:
        written = target.write(loaded, folder, sampler, mode)
        write_model_card(folder, {**export_record(loaded, written), "folder": str(out)})
    return out
