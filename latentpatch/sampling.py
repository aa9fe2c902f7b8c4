"""Full-size sampling: per-image seeded noise, the full coordinate grid, guidance, and a sampler -> latents.

Patch Diffusion samples like any diffusion model: the network sees the whole latent with the full
coordinate grid (Wang et al. 2023, Sec. 3.3), i.e. exactly what a training step with a full-size crop sees.
"""

from __future__ import annotations

import contextlib
import hashlib
from typing import Any, Sequence

import torch
from torch import Tensor

from latentpatch.diffusion.guidance import guided_denoiser
from latentpatch.diffusion.samplers import get_sampler, karras_sigmas, per_image_noise_fn
from latentpatch.errors import UserError
from latentpatch.models.conditioning import Conditioning
from latentpatch.patches import full_coordinates


def image_seed(seed: int, index: int, stream: str = "") -> int:
    """The generator seed of image `index` of a job with seed `seed` (63 bits of sha256("seed/index")).

    Image i's starting noise and churn noise come from its own generator, so it is the same image
    whatever the batch size or the number of processes. `stream` names another independent draw.
    """
    key = f"{int(seed)}/{int(index)}" if not stream else f"{stream}/{int(seed)}/{int(index)}"
    digest = hashlib.sha256(key.encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def check_settings(sampler: str, steps: int, guidance: float, churn: float) -> None:
    """UserError for settings no sampler can run, before anything is loaded."""
    get_sampler(sampler)
    if not isinstance(steps, int) or steps < 1:
        raise UserError(f"--steps must be a whole number >= 1, got {steps}")
    if not guidance >= 0:
        raise UserError(f"--guidance must be >= 0 (1 = no guidance, 0 = unconditional), got {guidance}")
    if not churn >= 0:
        raise UserError(f"--churn must be >= 0, got {churn}")
    if churn > 0 and sampler == "dpmpp_2m":
        raise UserError("the dpmpp_2m sampler is deterministic; use --churn with the heun or euler sampler")


def num_classes(run: Any) -> int:
    """Classes of a loaded run (0 = not class-conditional); run.json says, the model config agrees."""
    return int(run.info.get("num_classes") or run.cfg.model.num_classes or 0)


def is_text_conditioned(run: Any) -> bool:
    model = run.cfg.model
    return run.info.get("text_encoder") is not None or model.text_dim > 0 or model.pooled_text_dim > 0


def check_class_labels(run: Any, class_labels: Sequence[int]) -> None:
    k = num_classes(run)
    if k == 0:
        raise UserError("this model has no classes (it was trained without class labels); drop --class")
    for c in class_labels:
        if isinstance(c, bool) or not isinstance(c, int) or not 0 <= c < k:
            raise UserError(f"class {c!r} is out of range: this model has classes 0..{k - 1}")


def build_conditioning(
    run: Any, prompts: Sequence[str] | None = None, class_labels: Sequence[int] | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Conditioning | None, Conditioning | None]:
    """(cond, uncond) for a batch: one prompt or class per image; uncond is the null label / the empty
    caption "" (what caption dropout trained). Prompts are embedded by the run's own text encoder."""
    if prompts is not None and class_labels is not None:
        raise UserError("give prompts or class labels, not both")
    if prompts is not None:
        if not is_text_conditioned(run):
            raise UserError(
                "this model is not text-conditioned; drop --prompt/--prompts (use --class for a class model)"
            )
        return prompt_conditioning(run, prompts, device)
    if is_text_conditioned(run):
        raise UserError('this model is text-conditioned; give --prompt/--prompts (--prompt "" samples it '
                        "unconditionally)")
    if class_labels is None:
        return None, None
    check_class_labels(run, class_labels)
    labels = torch.tensor([int(c) for c in class_labels], dtype=torch.long, device=device)
    null = torch.full_like(labels, num_classes(run))  # label num_classes is the dropped (null) label
    return Conditioning(class_labels=labels), Conditioning(class_labels=null)


def run_text_encoder(run: Any, device: torch.device | str = "cpu") -> Any:
    """The text encoder a run was trained with (run.json's record), loaded once and kept on the run."""
    from latentpatch.text import load_text_encoder, load_text_encoder_from_record

    encoder = getattr(run, "text_encoder", None)
    if encoder is None:
        record, tc = run.info.get("text_encoder"), run.cfg.text
        if record:
            encoder = load_text_encoder_from_record(record, device=device)
        elif tc.model:
            encoder = load_text_encoder(tc.model, tc.pretrained, max_length=tc.max_length, device=device)
        else:
            raise UserError("this text-conditioned run records no text encoder (run.json text_encoder, "
                            "config text.model); it cannot embed prompts")
        try:
            run.text_encoder = encoder
        except AttributeError:
            pass  # a read-only stand-in for a run: load again next time
    elif encoder.device != torch.device(device):
        encoder.to(device)  # validated on the CPU before a job, then used where the model runs
    return encoder


def prompt_conditioning(
    run: Any, prompts: Sequence[str], device: torch.device | str = "cpu"
) -> tuple[Conditioning, Conditioning]:
    """Prompts and as many empty captions through the run's text encoder, cut to one common length."""
    from latentpatch.text import trim_to_longest

    prompts = [str(p) for p in prompts]
    emb = run_text_encoder(run, device).encode(prompts + [""])
    tokens, mask = trim_to_longest(emb.tokens, emb.mask)
    n, pooled_used = len(prompts), run.cfg.model.pooled_text_dim > 0

    def cond(rows: Any) -> Conditioning:
        return Conditioning(text_tokens=tokens[rows].to(device), text_mask=mask[rows].to(device),
                            text_pooled=emb.pooled[rows].to(device) if pooled_used else None)

    null_rows = torch.full((n,), n, dtype=torch.long)
    return cond(torch.arange(n)), cond(null_rows)


@torch.no_grad()
def generate_latents(
    precond: Any,
    seeds: Sequence[int],
    shape: Sequence[int],
    cond: Conditioning | None = None,
    uncond: Conditioning | None = None,
    *,
    sampler: str = "heun",
    steps: int = 18,
    guidance: float = 1.0,
    churn: float = 0.0,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
    autocast: bool | None = None,
    progress: bool = False,
) -> Tensor:
    """Sample one latent per seed: [len(seeds), *shape] float32 (shape = [C, h, w]) on `device`.

    `precond(x, sigma[B], coords[B, 2, h, w], cond) -> D(x)` (EDMPrecond). Noise is drawn on the CPU from
    one generator per seed, so an image does not depend on its batch, and matches across devices up to
    the network's arithmetic. The sampler integrates in `dtype` (float64 like EDM); bf16 autocast on CUDA.
    """
    check_settings(sampler, steps, guidance, churn)
    device = torch.device(device)
    c, h, w = (int(s) for s in shape)
    coords = full_coordinates(len(seeds), h, w, device=device, dtype=torch.float32)
    use_autocast = device.type == "cuda" if autocast is None else autocast

    def precond_amp(x: Tensor, sigma: Tensor, coords_: Tensor, cond_: Conditioning | None) -> Tensor:
        amp = torch.autocast(device.type, dtype=torch.bfloat16) if use_autocast else contextlib.nullcontext()
        with amp:
            return precond(x, sigma, coords_, cond_)

    denoise = guided_denoiser(precond_amp, coords, cond, uncond, guidance)
    noise_fn = per_image_noise_fn(list(seeds), device="cpu")
    sigmas = karras_sigmas(steps, sigma_min, sigma_max, rho, device=device)
    x = noise_fn(torch.empty((len(seeds), c, h, w), device=device, dtype=dtype)) * sigmas[0].to(dtype)
    x = get_sampler(sampler)(denoise, x, sigmas, noise_fn=noise_fn, churn=churn, progress=progress)
    return x.to(torch.float32)
