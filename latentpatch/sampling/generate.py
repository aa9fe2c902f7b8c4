"""Batch generation: a job of N images from a run, written as PNGs with the settings that made each one.

    out/job.json       every setting that decides the pixels + the list of (index, prompt/class, image_seed)
    out/00000042.png   image 42 (settings in its "latentpatch" text chunk)
    out/images.jsonl   one line per image, appended after its PNG is in place
    out/grid.png       the first 64 images

A job resumes: an image is done when its PNG exists (written to a temp name, then renamed), so a killed job
started again makes only what is missing. Under `torchrun`, rank r makes images r, r + world, ...
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import Tensor

import latentpatch
from latentpatch import distributed as dist
from latentpatch.sampling import job_folder as folder
from latentpatch.conditioning.requested import check_request, request_conditioning
from latentpatch.device import resolve_device
from latentpatch.denoiser import sampling_sigmas
from latentpatch.errors import UserError
from latentpatch.io import lock_folder
from latentpatch.sampling.caches import check_cache, job_cache
from latentpatch.sampling.prompts import PromptEntry
from latentpatch.runs import LoadedRun, load_run
from latentpatch.sampling.latents import generate_latents
from latentpatch.sampling.options import DEFAULTS, SampleOptions, sample_options
from latentpatch.sampling.shape import own_size, sample_shape
from latentpatch.seeding import image_seed
from latentpatch.text.memo import MemoEncoder, memo_encoder

JOB_FORMAT = 1


@dataclass(frozen=True)
class ImageSpec:
    """One image of a job: its global index, what it is conditioned on, and its generator seed."""

    index: int
    prompt: str | None
    class_label: int | None
    image_seed: int

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "prompt": self.prompt, "class": self.class_label, "image_seed": self.image_seed}


@dataclass
class Job:
    settings: dict[str, Any]  # everything that decides the pixels, JSON-ready (the run's, then the options')
    images: list[ImageSpec] = field(default_factory=list)

    @property
    def options(self) -> SampleOptions:
        return SampleOptions.from_job_settings(self.settings)

    def to_dict(self) -> dict[str, Any]:
        return {"format_version": JOB_FORMAT, "settings": self.settings, "images": [i.to_dict() for i in self.images]}


@dataclass
class JobResult:
    out: Path
    total: int  # images in the job
    written: int  # images this process wrote now
    skipped: int  # images already there when it started (all ranks)
    seconds: float

    @property
    def images_per_s(self) -> float:
        return self.written / self.seconds if self.seconds > 0 else 0.0


def _random_class(seed: int, index: int, k: int) -> int:
    """A class for a class-conditional model when none is asked for (like EDM), fixed by (seed, index)."""
    return image_seed(seed, index, stream="class") % k


def plan_images(
    loaded: LoadedRun, n: int, seed: int, prompts: Sequence[PromptEntry] | None, class_labels: Sequence[int] | None
) -> list[ImageSpec]:
    """n images per prompt (or its JSONL count) / per class label; a class model with none given draws one."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise UserError(f"--n must be a whole number >= 1, got {n}")
    if prompts is not None and class_labels is not None:
        raise UserError("give prompts or a class, not both")
    spec = loaded.spec
    # Fail before any file is written, not mid-job.
    check_request(spec, None if prompts is None else [e.prompt for e in prompts], class_labels)
    if prompts is not None:
        conds = [(e.prompt, None) for e in prompts for _ in range(e.count)]
    elif class_labels is not None:
        conds = [(None, int(c)) for c in class_labels for _ in range(n)]
    elif spec.num_classes > 0:
        conds = [(None, _random_class(seed, i, spec.num_classes)) for i in range(n)]
    else:
        conds = [(None, None)] * n
    return [ImageSpec(i, p, c, image_seed(seed, i)) for i, (p, c) in enumerate(conds)]


def make_job(
    loaded: LoadedRun, n: int, options: SampleOptions = DEFAULTS, *, prompts: Sequence[PromptEntry] | None = None,
    class_labels: Sequence[int] | None = None,
) -> Job:
    """The job spec: settings + one ImageSpec per image; nothing is generated or written. `options` are
    checked already (`SampleOptions.check`); here only against the run (its size too)."""
    if options.guidance != 1 and not loaded.spec.conditional:
        raise UserError(f"--guidance {options.guidance} needs a class- or text-conditioned model; this one is "
                        "unconditional")
    images = plan_images(loaded, n, int(options.seed), prompts, class_labels)
    check_cache(loaded.precond, options.cache)  # a method this network has, before a file is written
    # checked against the run and the device's memory (a Notice for a shape it never trained at full size)
    shape = sample_shape(loaded, options.size, min(options.batch_size, len(images)))
    options = replace(options, size=own_size(loaded, options.size))  # the run's shape: one job, as job.json was
    cfg = loaded.cfg.edm
    settings = {
        "run": str(loaded.run_dir.resolve()),
        "checkpoint": str(Path(loaded.checkpoint).resolve()),
        "weights": loaded.weights,
        "checkpoint_id": loaded.checkpoint_id,  # sha256 of the weights file used
        "step": loaded.step,
        **options.job_settings(),  # sampler, steps, guidance, churn, seed
        "sigma_min": float(cfg.sigma_min),
        "sigma_max": float(cfg.sigma_max),
        "latent_shape": list(shape),
        "autoencoder": loaded.info["autoencoder"],
    }
    return Job(json.loads(json.dumps(settings)), images)


def load_autoencoder_for(loaded: LoadedRun, device: torch.device | str) -> Any:
    """The autoencoder recorded in run.json, or a UserError saying which one this run needs."""
    from latentpatch.autoencoders import load_autoencoder_from_info

    info = loaded.info.get("autoencoder")
    if not info:
        raise UserError(f"{loaded.run_dir}/run.json records no autoencoder; cannot decode")
    try:
        return load_autoencoder_from_info(info, device=device)
    except UserError as e:
        raise UserError(
            f"this run needs the autoencoder {info.get('source')!r} (kind {info.get('kind')}, revision "
            f"{info.get('revision')}) to decode its latents, and it could not be loaded: {e}"
        ) from e


def sample_batch(loaded: LoadedRun, autoencoder: Any, job: Job, specs: Sequence[ImageSpec], device: torch.device,
                 progress: bool = False, *, cache: Any = None, text: MemoEncoder | None = None) -> Tensor:
    """Sample the latents of `specs` and decode them: [B, 3, H, W] float32 in [-1, 1]. `cache`: the job's
    `job_cache(...)` (its options' --cache), cleared here for this batch; None: the run's denoiser as loaded.
    `text`: the job's `memo_encoder(...)`, so a prompt goes through the tower once per job; None: the run's own
    encoder, every prompt of the batch through it."""
    s, options = job.settings, job.options
    precond = loaded.precond if cache is None else cache.fresh()
    prompts = [x.prompt for x in specs] if specs[0].prompt is not None else None
    classes = [x.class_label for x in specs] if specs[0].class_label is not None else None
    encoder = text if text is not None else loaded.text_encoder()
    cond, uncond = request_conditioning(loaded.spec, encoder, prompts, classes, device)
    guidance, net = options.guidance, loaded.precond.net
    if getattr(net, "embeds_guidance", False):  # FLUX.1-dev: the guidance is the network's own input
        net.guidance_scale, guidance = guidance, 1.0
    latents = generate_latents(
        precond, [x.image_seed for x in specs], s["latent_shape"], cond, uncond,
        sampler=options.sampler, steps=options.steps, guidance=guidance, churn=options.churn,
        sigma_min=s["sigma_min"], sigma_max=s["sigma_max"], coordinate_scale=loaded.cfg.patches.coordinate_scale,
        device=device, progress=progress, sigmas=sampling_sigmas(loaded.cfg, options.steps, s["latent_shape"][1:]),
    )
    return autoencoder.decode(latents)


def image_metadata(job: Job, spec: ImageSpec, class_names: list[str] | None) -> dict[str, Any]:
    """What made this image: every job setting, its own (index, prompt/class, seed) and the file name."""
    meta = {"file": folder.image_name(spec.index), **spec.to_dict(), **job.settings,
            "latentpatch_version": latentpatch.__version__}
    if class_names and spec.class_label is not None:
        meta["class_name"] = class_names[spec.class_label]
    return meta


def _from_main(obj: Any, d: dist.DistInfo) -> Any:
    """Rank 0's value of a small picklable object on every rank (identity for one process)."""
    if d.world_size == 1:
        return obj
    import torch.distributed

    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def _write_image(out: Path, image: Tensor, meta: dict[str, Any]) -> None:
    folder.write_png(out / meta["file"], image, meta)
    folder.append_index(out, meta)  # only after the PNG is in place


def _batched(items: list, size: int):
    for start in range(0, len(items), size):
        yield items[start : start + size]


def run_job(
    loaded: LoadedRun, job: Job, out: str | os.PathLike, *, batch_size: int = DEFAULTS.batch_size,
    progress: bool = True, dist_info: dist.DistInfo | None = None,
) -> JobResult:
    """Write the job's missing images into `out` (resumable; one job per folder, held by a lock file).

    Under torchrun each rank makes indices rank::world; rank 0 owns the folder (lock, job.json, index, grid).
    `dist_info` is `distributed.init_distributed()`'s result (joined here when None); `batch_size` a checked
    `SampleOptions.batch_size`.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    device = loaded.device
    d = dist_info if dist_info is not None else dist.init_distributed(device)
    total, lock = len(job.images), None
    try:
        if d.is_main:
            try:
                lock = lock_folder(out, folder.LOCK_FILE, "sample job")
                folder.check_or_write_job(out, job.to_dict())
                folder.rebuild_index(out, total)
                status = ("ok", len(folder.done_indices(out, total)))
            except UserError as e:
                status = ("error", str(e))
        status = _from_main(status if d.is_main else None, d)
        if status[0] == "error":
            raise UserError(status[1])
        autoencoder = load_autoencoder_for(loaded, device)
        mine = [s for s in job.images[d.rank :: d.world_size] if not folder.image_path(out, s.index).exists()]
        class_names = loaded.spec.class_names
        start = time.perf_counter()
        # PNG encoding and fsync'd writes run on threads (zlib and I/O release the GIL) while the next batch
        # samples; waiting for batch k's writes before submitting batch k+1's bounds memory to two batches.
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool, \
                tqdm(total=len(mine), unit="img", disable=not (progress and d.is_main), desc="sampling") as bar, \
                job_cache(loaded.precond, job.options.cache) as cache:
            pending: list = []
            text = memo_encoder(loaded.text_encoder())
            for specs in _batched(mine, batch_size):
                images = folder.to_uint8(sample_batch(loaded, autoencoder, job, specs, device, cache=cache, text=text))
                for future in pending:
                    future.result()
                pending = [pool.submit(_write_image, out, img, image_metadata(job, spec, class_names))
                           for spec, img in zip(specs, images)]
                bar.update(len(specs))
            for future in pending:
                future.result()
        seconds = time.perf_counter() - start
        dist.barrier(d)
        if d.is_main:
            folder.rebuild_index(out, total)
            folder.write_grid(out, total)
        return JobResult(out, total, len(mine), status[1], seconds)
    finally:
        if lock is not None:
            lock.release()
        if dist_info is None:
            dist.cleanup(d)


def _as_entries(prompts: str | Sequence[str | PromptEntry] | None, n: int) -> list[PromptEntry] | None:
    if prompts is None:
        return None
    if isinstance(prompts, str):
        prompts = [prompts]
    return [p if isinstance(p, PromptEntry) else PromptEntry(str(p), n) for p in prompts]


def sample(
    run: str | os.PathLike | LoadedRun,
    n: int = 1,
    *,
    options: SampleOptions | None = None,
    prompts: str | Sequence[str | PromptEntry] | None = None,
    class_labels: int | Sequence[int] | None = None,
    weights: str = "ema",
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    out: str | os.PathLike | None = None,
    output: str = "pil",
    progress: bool = False,
    **settings: Any,
) -> list | Tensor | JobResult:
    """Generate n images per prompt / class label (n in all without either) from a run folder.

    How it samples is a SampleOptions (latentpatch.sampling.options: steps, sampler, guidance, churn, seed,
    batch_size, size, cache), given whole as `options` or field by field as keywords (`guidance=4.0`), checked once here.
    `run` is a run folder or a `load_run` result (then weights/checkpoint/device are its own). Image i's noise
    comes from a generator seeded with image_seed(seed, i), so it is the same whatever batch_size or number of
    processes. With `out` the images are written as a resumable job (PNG + images.jsonl + grid.png, split over
    torchrun ranks) and read back from the PNGs. output: "pil" (list of PIL images), "tensor" ([N, 3, H, W] float32
    in [0, 1]: the 8-bit pixels of the PNGs, /255, with or without `out`) or, with `out`, "none" (a JobResult,
    nothing read back). `size`: the images' (H, W) in pixels, height first as torch writes shapes (N: N x N; the
    command line's `--size` is WxH, width first); None: the run's training shape.

        >>> images = latentpatch.sample("runs/cifar", n=8, class_labels=3, guidance=2.0)
    """
    options = sample_options(options, **settings)
    if output not in ("pil", "tensor", "none") or (output == "none" and out is None):
        raise UserError(f"output must be 'pil' or 'tensor' ('none' only with out=), got {output!r}")
    options.check()
    if isinstance(class_labels, int):
        class_labels = [class_labels]
    # Join torchrun's group first: each rank loads the model onto its own GPU.
    d = dist.init_distributed(device) if out is not None else None
    try:
        if isinstance(run, LoadedRun):
            loaded = run
        else:
            dev = d.device if d is not None else resolve_device(device)
            loaded = load_run(Path(run), weights=weights, checkpoint=checkpoint, device=dev)
        job = make_job(loaded, n, options, prompts=_as_entries(prompts, n), class_labels=class_labels)
        if out is not None:
            result = run_job(loaded, job, out, batch_size=options.batch_size, progress=progress, dist_info=d)
            if output == "none":
                return result
            return folder.read_images(Path(out), len(job.images), as_tensor=output == "tensor")
    finally:
        if d is not None:
            dist.cleanup(d)
    from tqdm.auto import tqdm

    dev = loaded.device
    autoencoder = load_autoencoder_for(loaded, dev)
    batches = list(_batched(job.images, options.batch_size))
    text = memo_encoder(loaded.text_encoder())
    with job_cache(loaded.precond, job.options.cache) as cache:
        images = torch.cat([sample_batch(loaded, autoencoder, job, specs, dev, cache=cache, text=text).cpu()
                            for specs in tqdm(batches, unit="batch", disable=not progress, desc="sampling")])
    pixels = folder.to_uint8(images)  # what a job's PNGs hold, so `out` never changes the values
    if output == "tensor":
        return pixels.float() / 255
    return [folder.to_pil(img) for img in pixels]


__all__ = ["ImageSpec", "Job", "JobResult", "sample_batch", "make_job", "plan_images", "run_job", "sample"]
