"""The arms: a name and the `--cache` value it samples with (None: the uncached sampler); every arm of a run
samples the same job (prompts or classes, guidance, sampler, steps, seeds), so only the cache differs."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

ARMS: dict[str, str | None] = {
    "uncached": None,
    "step i2": "step:interval=2,order=1,warmup=3",
    "step i3": "step:interval=3,order=1,warmup=3",
    "step i4": "step:interval=4,order=1,warmup=3",
    "step i3 o0": "step:interval=3,order=0,warmup=3",
    "ras r0.5 i4": "ras:ratio=0.5,interval=4,warmup=2",
    "ras r0.25 i4": "ras:ratio=0.25,interval=4,warmup=2",
    "ras r0.25 i8": "ras:ratio=0.25,interval=8,warmup=2",
    "deepcache i2": "deepcache:interval=2,level=0,warmup=1",
    "deepcache i3": "deepcache:interval=3,level=0,warmup=1",
    "deepcache i5": "deepcache:interval=5,level=0,warmup=1",
    "deepcache i3 l1": "deepcache:interval=3,level=1,warmup=1",
}


def arms_for(loaded: Any, names: list[str] | None) -> dict[str, str | None]:
    """The arms whose method fits the run's network (all of them, or `names`), uncached first."""
    from latentpatch.sampling.caches import check_cache
    from latentpatch.errors import UserError

    chosen = {}
    for name in names or list(ARMS):
        try:
            check_cache(loaded.precond, ARMS[name])
        except UserError:
            if names:
                raise
            continue
        chosen[name] = ARMS[name]
    return {"uncached": None} | chosen


def add_job_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run", help="a run folder (latentpatch-demo/run, a UNet trained on the demo's store, ...)")
    p.add_argument("--arms", default=None, help=f"comma-separated arm names (default: all that fit): {', '.join(ARMS)}")
    p.add_argument("--prompts", default="red brick wall,green grass,blue gravel,starry night sky",
                   help="comma-separated prompts of a text-conditioned run (the demo's captions); '' for none")
    p.add_argument("--guidance", type=float, default=3.0, help="the demo samples with 3")
    p.add_argument("--steps", type=int, default=18)
    p.add_argument("--sampler", default="heun")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the run's)")
    p.add_argument("--threads", type=int, default=1)


def job_kwargs(args: argparse.Namespace, per_prompt: int, seed: int) -> dict[str, Any]:
    """lp.sample keywords of one arm's job: `per_prompt` images per prompt (or in all), from `seed`."""
    prompts = [p for p in args.prompts.split(",") if p] or None
    kw = dict(n=per_prompt, prompts=prompts, guidance=args.guidance if prompts else 1.0, steps=args.steps,
              sampler=args.sampler, batch_size=args.batch_size, seed=seed)
    if args.size:
        kw["size"] = args.size
    return kw


def write_result(path: Path | None, result: dict[str, Any]) -> None:
    """The raw results as JSON at `path` (--out), if one was given."""
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1) + "\n")
