"""Images/s of each cache arm against the uncached sampler: the whole `lp.sample` job (text conditioning, the
sampler's network calls, decoding), process CPU time with one torch thread, in interleaved rounds (the arms'
order rotates each round), every arm on the same seeds. Each round also times the part no cache touches (text
conditioning and decoding of the same images), so the sampler's own speed-up is reported beside the whole job's.
A job embeds each distinct prompt once (`latentpatch.text.memo`), so the text tower's share shrinks as a job
grows: `--n` sets the job's size (images per prompt), and with it how much of a batch job this measures.
`--per-batch-text` adds the arm "uncached, per-batch text": the uncached sampler with every batch's prompts
through the tower again, as every job ran before the memo (what the memo alone gains).

    python -m benchmarks.caching.speed latentpatch-demo/run --n 4 --rounds 3 --out docs/figures/caching-speed-demo.json
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
import unittest.mock
from pathlib import Path

import torch

from latentpatch.conditioning.requested import request_conditioning
from latentpatch.runs import load_run
from latentpatch.sampling import generate
from latentpatch.sampling.generate import load_autoencoder_for, sample
from latentpatch.text.memo import memo_encoder

from .arms import add_job_arguments, arms_for, job_kwargs, write_result


def fixed_cost(loaded, autoencoder, kw: dict, shape: list[int]) -> float:
    """CPU seconds of what every arm does alike for the job `kw`: its text conditioning (each distinct prompt
    once, through the job's memo, as `sample` does) and its decoding."""
    prompts = [p for p in kw["prompts"] for _ in range(kw["n"])] if kw["prompts"] else [None] * kw["n"]
    start = time.process_time()
    text = memo_encoder(loaded.text_encoder())
    with torch.no_grad():
        for first in range(0, len(prompts), kw["batch_size"]):
            batch = prompts[first: first + kw["batch_size"]]
            request_conditioning(loaded.spec, text, batch if kw["prompts"] else None, None, "cpu")
            autoencoder.decode(torch.zeros(len(batch), *shape))
    return time.process_time() - start


PER_BATCH_TEXT = "uncached, per-batch text"


def _job(loaded, arm: str, spec: str | None, kw: dict):
    """One arm's whole job; the per-batch-text arm without the job's text memo (every batch through the tower)."""
    off = contextlib.nullcontext() if arm != PER_BATCH_TEXT else \
        unittest.mock.patch.object(generate, "memo_encoder", lambda encoder: None)
    with off:
        return sample(loaded, cache=spec, output="tensor", **kw)


def _spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def measure(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    loaded = load_run(Path(args.run), device="cpu")
    arms = arms_for(loaded, args.arms.split(",") if args.arms else None)
    if args.per_batch_text:
        arms = {"uncached": None, PER_BATCH_TEXT: None} | arms
    autoencoder = load_autoencoder_for(loaded, "cpu")
    images = args.n * max(1, len([p for p in args.prompts.split(",") if p]))
    for arm, spec in arms.items():  # warm-up: imports, first allocations
        _job(loaded, arm, spec, job_kwargs(args, 1, seed=0))
    seconds: dict[str, list[float]] = {arm: [] for arm in arms}
    fixed: list[float] = []
    shape = None
    for r in range(args.rounds):
        names = list(arms)[r % len(arms):] + list(arms)[: r % len(arms)]
        kw = job_kwargs(args, args.n, seed=1000 + r)
        for arm in names:
            start = time.process_time()
            out = _job(loaded, arm, arms[arm], kw)
            seconds[arm].append(time.process_time() - start)
        shape = shape or [loaded.info["latent_shape"][0]] + [s // loaded.info["autoencoder"]["factor"]
                                                             for s in out.shape[-2:]]
        fixed.append(fixed_cost(loaded, autoencoder, kw, shape))
        print(f"round {r}: " + ", ".join(f"{a} {images / seconds[a][-1]:.2f}" for a in arms) + " images/s; "
              f"fixed {fixed[-1]:.1f} s", flush=True)
    base = seconds["uncached"]
    result = {"run": str(args.run), "images_per_round": images, "latent_shape": shape,
              "settings": {k: v for k, v in vars(args).items() if k not in ("run", "out")},
              "torch_threads": torch.get_num_threads(), "fixed_s": fixed, "arms": {}}
    for arm, spec in arms.items():
        whole = [b / t for b, t in zip(base, seconds[arm])]
        sampler = [(b - f) / (t - f) for b, t, f in zip(base, seconds[arm], fixed)]  # f: with the memo
        result["arms"][arm] = {"cache": spec, "seconds": seconds[arm],
                               "images_per_s": _spread([images / t for t in seconds[arm]]),
                               "speedup": _spread(whole),
                               "sampler_speedup": None if arm == PER_BATCH_TEXT else _spread(sampler)}
    return result


def print_table(result: dict) -> None:
    print(f"\n{result['images_per_round']} images a round, latents {result['latent_shape']}, "
          f"{len(result['fixed_s'])} rounds; ratios: median [min, max] over rounds")
    print("| arm | --cache | images/s (median) | speed-up, whole job | speed-up, sampler alone |")
    print("|---|---|---:|---:|---:|")
    for arm, r in result["arms"].items():
        s, t = r["speedup"], r["sampler_speedup"]
        alone = f"{t['median']:.2f} [{t['min']:.2f}, {t['max']:.2f}]" if t else "–"
        print(f"| {arm} | {r['cache'] or 'off'} | {r['images_per_s']['median']:.2f} | {s['median']:.2f} "
              f"[{s['min']:.2f}, {s['max']:.2f}] | {alone} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_job_arguments(p)
    p.add_argument("--n", type=int, default=4, help="images per prompt (or in all) per arm and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--per-batch-text", action="store_true",
                   help="add the uncached arm without the job's text memo (every batch's prompts through the tower)")
    p.add_argument("--out", type=Path, default=None, help="the raw results as JSON")
    args = p.parse_args()
    result = measure(args)
    print_table(result)
    write_result(args.out, result)


if __name__ == "__main__":
    main()
