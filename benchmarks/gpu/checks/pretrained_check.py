"""Check 7: fine-tuning starts exactly from the pretrained model, on the device, in fp32 and under bf16 autocast.

The pretrained denoiser wrapper (built as lp.finetune builds it: widened network, the scheduler's own
preconditioning) against diffusers' model + DDPMScheduler's x0 prediction, as tests/test_pretrained.py does on
the CPU with tiny models of the same shapes (tiny_bases.py), plus a random DiTTransformer2DModel of
DiT-XL/2's size. The error is max|D - x0| over the largest |x| compared (the CPU test's 1e-6 scale).
fp32 runs with TF32 off: "exact" means no reduced-precision matmuls.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch

from latentpatch.conditioning import Conditioning
from latentpatch.denoiser import build_precond
from latentpatch.diffusion.vp import schedule_sigmas
from latentpatch.finetuning.starting_points import diffusers_base  # what lp.finetune starts a diffusers base from
from latentpatch.patches import full_coordinates

from .common import C, Context, Row
from .tiny_bases import DIT_SCHEDULER, SD_SCHEDULER, TEXT_WIDTH, tiny_dit, tiny_sd_unet

TIMESTEPS = (0, 100, 500, 999)
AIMS = {"fp32": 1e-5, "bf16": 2e-2}


def save_bases(root: Path, xl: dict[str, int]) -> dict[str, Path]:
    """Model folders (network/ + scheduler/) the way a pipeline holds them."""
    from diffusers import DDIMScheduler, DiTTransformer2DModel, PNDMScheduler

    tiny_sd_unet().save_pretrained(root / "unet" / "unet")
    PNDMScheduler(**SD_SCHEDULER).save_pretrained(root / "unet" / "scheduler")
    tiny_dit().save_pretrained(root / "dit" / "transformer")
    torch.manual_seed(4)
    DiTTransformer2DModel(in_channels=C, out_channels=2 * C, patch_size=2, num_embeds_ada_norm=1000,
                          **xl).save_pretrained(root / "xl" / "transformer")
    for name in ("dit", "xl"):
        DDIMScheduler(**DIT_SCHEDULER).save_pretrained(root / name / "scheduler")
    return {"tiny SD UNet": root / "unet", "tiny DiT": root / "dit", f"DiT-XL/2-sized ({xl['num_layers']} layers)":
            root / "xl"}


@torch.no_grad()
def max_error(ctx: Context, root: Path, bf16: bool) -> float:
    from diffusers import DDPMScheduler

    # An explicit text encoder: nothing is loaded (the pipeline's own would need its tokenizer and open_clip).
    found = diffusers_base(str(root), None, "ViT-B-32" if (root / "unet").is_dir() else None)
    cfg = found.cfg
    cfg.edm.sigma_data, cfg.model.attention = 1.0, "sdpa"
    unet = found.class_name == "UNet2DConditionModel"
    if unet:
        cfg.model.text_dim = TEXT_WIDTH
    precond = build_precond(cfg, C, device=ctx.device, init_state=found.state).to(ctx.device).eval()
    theirs_net = found.pipeline.load_network().to(ctx.device).eval()
    scheduler = DDPMScheduler.from_config(cfg.edm.scheduler, clip_sample=False)
    sigmas = schedule_sigmas(cfg.edm.scheduler)
    side = theirs_net.config.sample_size
    g = torch.Generator().manual_seed(0)
    x0, noise = (torch.randn(2, C, side, side, generator=g) for _ in range(2))
    text = torch.randn(2, 77, TEXT_WIDTH, generator=g).to(ctx.device)
    labels = torch.tensor([3, 7], device=ctx.device)
    cond = Conditioning(text_tokens=text, text_mask=torch.ones(2, 77, dtype=torch.bool, device=ctx.device)) if unet \
        else Conditioning(class_labels=labels)
    amp = torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=bf16)
    worst = 0.0
    for t in TIMESTEPS:
        x_t = scheduler.add_noise(x0, noise, torch.tensor([t, t]))
        tt = torch.tensor([t, t], device=ctx.device)
        with amp:
            out = theirs_net(x_t.to(ctx.device), tt, **({"encoder_hidden_states": text} if unet
                                                        else {"class_labels": labels})).sample
        out = out[:, :C].float().cpu()  # a learned-sigma DiT: the mean half
        x0_theirs = torch.cat([scheduler.step(out[i:i + 1], t, x_t[i:i + 1]).pred_original_sample for i in range(2)])
        x = x_t / scheduler.alphas_cumprod[t].sqrt()  # the same noisy latent in EDM's variable
        with amp:
            d = precond(x.to(ctx.device), sigmas[t].expand(2).to(ctx.device),
                        full_coordinates(2, side, side, device=ctx.device), cond)
        worst = max(worst, float((d.float().cpu() - x0_theirs).abs().max()) / float(x.abs().max()))
    return worst


def run(ctx: Context) -> list[Row]:
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False  # the trainer turned them on
    try:
        with tempfile.TemporaryDirectory() as tmp:
            bases = save_bases(Path(tmp), ctx.sizes.xl_diffusers)
            errors = {p: {name: max_error(ctx, root, p == "bf16") for name, root in bases.items()}
                      for p in ("fp32", "bf16")}
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    rows = []
    for p, by_model in errors.items():
        worst = max(by_model.values())
        rows.append(Row(f"7 pretrained x0 vs diffusers, {p}", float(f"{worst:.3g}"), "rel. error",
                        f"<= {AIMS[p]:g}", bool(worst <= AIMS[p]),
                        f"{ctx.device.type}; " + ", ".join(f"{k} {v:.2g}" for k, v in by_model.items())
                        + f"; timesteps {list(TIMESTEPS)}"))
    return rows
