"""CPU cost of a Patch Diffusion training step of an SD3-medium-shaped and a FLUX.1-shaped transformer: a
full-size step (batch B) against a half-side crop step (batch 2B, as latentpatch's schedule does), at 64x64 and
128x128 latents. Random weights, float32 (bf16 off on the CPU), one torch thread, process CPU time.

A step is the real fine-tuning computation: FlowPrecond around the stock transformer wrapped as a latentpatch
network (SD3Network / FluxNetwork: the crop's positions from its coordinates), FlowMatching.loss, backward
into every weight. The crops of a step sit at different offsets (FluxNetwork then runs one call per offset).

The real depths (SD3-medium 24 joint blocks; FLUX.1 19 double + 38 single blocks) cost too much on a CPU, and a
step's cost is linear in the number of blocks of each kind plus a fixed embedding/output cost, so each model is
measured at a few depths and the costs per block are their differences:
  sd3   0, 1 and 2 blocks: fixed = T(0); the last block (context_pre_only) = T(1) - T(0); a block = T(2) - T(1);
        24 blocks = T(1) + 23 (T(2) - T(1))
  flux  (double, single) = (0, 0), (1, 0), (0, 1): fixed = T(0, 0); a double block = T(1, 0) - T(0, 0), a single
        one = T(0, 1) - T(0, 0); the real model = fixed + 19 double + 38 single
Text: SD3's joint sequence of 333 tokens (77 CLIP + 256 T5) of width 4096, pooled 2048; FLUX.1-dev's 512 T5
tokens, pooled 768, and its distilled guidance input. Arms interleaved (full, crop, full, crop, ...) within
each depth, depths within each round, fixed seeds; medians and ranges over rounds; raw times as JSON.

    OMP_NUM_THREADS=1 python -m benchmarks.throughput.flow_crop_cost --rounds 3 --out flow_crop_cost.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from typing import Any

import torch

from latentpatch.conditioning import Conditioning
from latentpatch.diffusion.flow import FLUX_DEFAULTS, SD3_DEFAULTS, FlowMatching, FlowPrecond
from latentpatch.diffusion.flow_schedule import edm_sigma
from latentpatch.models.flow_base import wrap_flow_transformer
from latentpatch.patches import crop_coordinates, full_coordinates

C = 16  # latent channels of both
MODELS: dict[str, dict[str, Any]] = {
    "sd3-medium": dict(
        cls="SD3Transformer2DModel", text=333, pooled=2048, objective=SD3_DEFAULTS,
        scheduler=dict(num_train_timesteps=1000, shift=3.0),
        config=dict(sample_size=128, patch_size=2, in_channels=C, attention_head_dim=64, num_attention_heads=24,
                    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
                    out_channels=C, pos_embed_max_size=192),
        depths=[{"num_layers": 0}, {"num_layers": 1}, {"num_layers": 2}]),
    "flux": dict(
        cls="FluxTransformer2DModel", text=512, pooled=768, objective=FLUX_DEFAULTS,
        scheduler=dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True),
        config=dict(patch_size=1, in_channels=4 * C, attention_head_dim=128, num_attention_heads=24,
                    joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                    axes_dims_rope=(16, 56, 56)),
        depths=[{"num_layers": 0, "num_single_layers": 0}, {"num_layers": 1, "num_single_layers": 0},
                {"num_layers": 0, "num_single_layers": 1}]),
}


def build(model: dict[str, Any], depth: dict[str, int]) -> tuple[FlowPrecond, FlowMatching]:
    import diffusers

    torch.manual_seed(0)
    transformer = getattr(diffusers, model["cls"])(**model["config"], **depth)
    precond = FlowPrecond(wrap_flow_transformer(transformer)).train()
    return precond, FlowMatching(model["objective"], model["scheduler"])


def step_inputs(model: dict[str, Any], side: int, arm: str, batch: int, config: dict[str, Any] | None = None,
                tokens: int | None = None) -> dict[str, Any]:
    """The tensors of one step, from a fixed seed: full size at `batch`, or half-side crops at 2 * batch, each
    crop at its own offset on the token grid. `config`, `tokens`: a smaller transformer's widths and caption
    length (the GPU suite's smoke run), else the model's."""
    config, tokens = config or model["config"], tokens or model["text"]
    g = torch.Generator().manual_seed(1)
    n, crop = (batch, side) if arm == "full" else (2 * batch, side // 2)
    if arm == "full":
        coords = full_coordinates(n, side, side)
    else:
        offsets = torch.arange(n) * 2 % (side - crop + 1)
        coords = crop_coordinates(offsets, offsets.flip(0), crop, crop, side, side)
    cond = Conditioning(text_tokens=torch.randn(n, tokens, config["joint_attention_dim"], generator=g),
                        text_pooled=torch.randn(n, config["pooled_projection_dim"], generator=g))
    return dict(x0=torch.randn(n, C, crop, crop, generator=g), coords=coords, noise=torch.randn(n, C, crop, crop,
                generator=g), sigma=edm_sigma(torch.full((n,), 0.6)), cond=cond)


def timed_step(precond: FlowPrecond, objective: FlowMatching, inputs: dict[str, Any]) -> float:
    """Process CPU seconds of one forward + backward."""
    for p in precond.parameters():
        p.grad = None
    start = time.process_time()
    loss = objective.loss(precond, inputs["x0"], inputs["coords"], inputs["sigma"], inputs["noise"], inputs["cond"])
    loss.mean().backward()
    return time.process_time() - start


def derived(name: str, t: list[float]) -> dict[str, float]:
    """Fixed and per-block costs from the times of the model's depths, and the real model's step."""
    if name == "sd3-medium":
        fixed, last, block = t[0], t[1] - t[0], t[2] - t[1]
        return {"fixed": fixed, "last_block": last, "block": block, "real_depth": t[1] + 23 * block}
    fixed, double, single = t[0], t[1] - t[0], t[2] - t[0]
    return {"fixed": fixed, "double_block": double, "single_block": single,
            "real_depth": fixed + 19 * double + 38 * single}


def summary(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def measure(name: str, sides: list[int], rounds: int, batch: int) -> dict[str, Any]:
    model = MODELS[name]
    built = [build(model, depth) for depth in model["depths"]]
    for precond, objective in built:  # warm-up: the kernels and the allocator, on the smallest step
        timed_step(precond, objective, step_inputs(model, min(sides), "crop", 1))
    raw: dict[str, Any] = {}
    for side in sides:
        inputs = {arm: step_inputs(model, side, arm, batch) for arm in ("full", "crop")}
        times = {arm: [[0.0] * len(built) for _ in range(rounds)] for arm in inputs}
        for r in range(rounds):
            for d, (precond, objective) in enumerate(built):
                for arm in ("full", "crop"):
                    times[arm][r][d] = timed_step(precond, objective, inputs[arm])
                    print(f"{name} {side}x{side} round {r} depth {model['depths'][d]} {arm}: "
                          f"{times[arm][r][d]:.2f} s", flush=True)
        per_round = {arm: [derived(name, times[arm][r]) for r in range(rounds)] for arm in times}
        keys = per_round["full"][0].keys()
        raw[f"{side}x{side}"] = {
            "times": times, "depths": model["depths"],
            "per_arm": {arm: {k: summary([p[k] for p in per_round[arm]]) for k in keys} for arm in per_round},
            "crop_over_full": {k: summary([c[k] / f[k] for c, f in zip(per_round["crop"], per_round["full"])])
                               for k in keys},
        }
    return raw


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="sd3-medium,flux")
    parser.add_argument("--sides", default="64,128", help="latent sides (full size); crops are half of each")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1, help="full-size batch B; crop steps take 2B")
    parser.add_argument("--out", default="flow_crop_cost.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.process_time()
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    results: dict[str, Any] = {"settings": {**settings, "torch": torch.__version__, "cpu": cpu_name(),
                                            "threads": torch.get_num_threads(), "dtype": "float32",
                                            "clock": "process CPU time"}}
    for name in args.models.split(","):
        results[name] = measure(name, [int(s) for s in args.sides.split(",")], args.rounds, args.batch)
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
    results["settings"]["total_cpu_s"] = time.process_time() - start
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    for name in args.models.split(","):
        for size, r in results[name].items():
            full, crop, ratio = r["per_arm"]["full"], r["per_arm"]["crop"], r["crop_over_full"]
            for k in full:
                print(f"{name} {size} {k}: full {full[k]['median']:.2f} s, crop {crop[k]['median']:.2f} s, "
                      f"crop/full {ratio[k]['median']:.3f} ({ratio[k]['min']:.3f}-{ratio[k]['max']:.3f})")


if __name__ == "__main__":
    main()
