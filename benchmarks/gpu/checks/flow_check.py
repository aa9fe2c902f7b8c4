"""Check 11: what a half-side crop step costs against a full-size step of the flow-matching bases, with peak memory.

SD3-medium-shaped and FLUX.1-shaped transformers (random weights) wrapped as latentpatch fine-tunes them
(FlowPrecond around SD3Network / FluxNetwork, FlowMatching's loss, backward into every weight), at the latent
sides users fine-tune (64: 512 px, 128: 1024 px). Full size at batch B, half-side crops at 2B (the schedule's
batch growth); the shapes and inputs are benchmarks/throughput/flow_crop_cost.py's, which measures the same on the
CPU by depth differences. On the GPU the weights are bf16 (as a bf16 fine-tune holds them) and the depth is
`flow_depths` of the sizes: SD3-medium at its real 24 blocks; FLUX.1 at a stated fraction of its 19 + 38 blocks
(the full 12 B parameters with their gradients and activations at 1024 px do not fit one 80 GB card without
gradient checkpointing), so its peak memory is for that depth.
"""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.throughput.flow_crop_cost import MODELS, step_inputs
from latentpatch.diffusion.flow import FlowMatching, FlowPrecond
from latentpatch.models.flow_base import wrap_flow_transformer

from .common import Context, Row, clock, median

C = 16  # latent channels of both bases' VAE
STEPS = 3  # timed steps per arm, after one untimed


def build(name: str, ctx: Context) -> tuple[FlowPrecond, FlowMatching, dict[str, Any]]:
    import diffusers

    model = MODELS[name]
    config = {**model["config"], **ctx.sizes.flow_configs.get(name, {}), **ctx.sizes.flow_depths[name]}
    torch.manual_seed(0)
    transformer = getattr(diffusers, model["cls"])(**config)
    precond = FlowPrecond(wrap_flow_transformer(transformer)).to(ctx.device).train()
    if ctx.bf16:
        precond.to(torch.bfloat16)
    return precond, FlowMatching(model["objective"], model["scheduler"]), config


def inputs(name: str, config: dict[str, Any], side: int, arm: str, ctx: Context) -> dict[str, Any]:
    """One step's tensors (flow_crop_cost's, from its fixed seed) on the check's device."""
    step = step_inputs(MODELS[name], side, arm, ctx.sizes.flow_batch, config, ctx.sizes.flow_text_tokens.get(name))
    return {k: v.to(ctx.device) for k, v in step.items()}


def timed(precond: FlowPrecond, objective: FlowMatching, step: dict[str, Any], ctx: Context) -> tuple[float, float]:
    """Median seconds of a forward + backward, and the peak memory of those steps in GiB (0 on the CPU)."""
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    times = []
    for i in range(STEPS + 1):
        precond.zero_grad(set_to_none=True)
        t0 = clock(ctx.device)
        with ctx.autocast():
            loss = objective.loss(precond, step["x0"], step["coords"], step["sigma"], step["noise"], step["cond"])
        loss.float().mean().backward()
        if i:
            times.append(clock(ctx.device) - t0)
    peak = torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.device.type == "cuda" else 0.0
    return median(times), peak


def run(ctx: Context) -> list[Row]:
    rows = []
    for name in ("sd3-medium", "flux"):
        precond, objective, config = build(name, ctx)
        depth = ", ".join(f"{k}={v}" for k, v in ctx.sizes.flow_depths[name].items())
        for side, which in zip(ctx.sizes.flow_sides, ("smaller", "larger")):
            full, full_peak = timed(precond, objective, inputs(name, config, side, "full", ctx), ctx)
            crop, crop_peak = timed(precond, objective, inputs(name, config, side, "crop", ctx), ctx)
            rows.append(Row(f"11 {name} half-crop/full step, {which} latents", round(crop / full, 4), "x",
                            "report (< 0.5: a crop pays more than its area)", None,
                            f"{side}x{side} latents: full x{ctx.sizes.flow_batch} {full:.4f} s, peak {full_peak:.1f} GiB; half-side crops "
                            f"x{2 * ctx.sizes.flow_batch} {crop:.4f} s, peak {crop_peak:.1f} GiB; {depth}; "
                            f"{ctx.precision()}"))
        del precond
    return rows
