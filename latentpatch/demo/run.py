"""`latentpatch demo`: the whole pipeline on a built-in default, on a CPU, with no network, in minutes.

Builds a small captioned set from pictures scikit-image ships, encodes it with the shipped VAE, trains a
small text-conditioned DiT with the Patch Diffusion schedule, samples a row per prompt and writes
`samples.png`, `loss.png` and the run folder.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from latentpatch.demo.images import DEMO_SOURCES, make_demo_images
from latentpatch.sampling.options import DEFAULTS


@dataclass
class DemoOptions:
    out: Path = Path("latentpatch-demo")
    steps: int = 1200
    per_caption: int = 64
    resolution: int = 64
    samples_per_prompt: int = 8
    sample_steps: int = DEFAULTS.steps
    guidance: float = 3.0
    seed: int = 0
    device: str | None = None
    text_encoder: str = "ViT-B-32"  # random weights: nothing can be downloaded here (see the demo's notes)
    progress: bool = True


@dataclass
class DemoResult:
    out: Path
    run: Path
    samples: Path
    loss_curve: Path
    seconds: float
    prompts: list[str]


def demo_overrides(opts: DemoOptions) -> list[str]:
    return [f"train.max_steps={opts.steps}", f"train.seed={opts.seed}"]


def run_demo(opts: DemoOptions, log=print) -> DemoResult:
    """Each stage is the same library call the CLI makes; a rerun resumes where the last one stopped."""
    from torchvision.utils import save_image

    from latentpatch.checkpoints import latest_checkpoint, read_state
    from latentpatch.config import load_config
    from latentpatch.encoding.encode import encode
    from latentpatch.sampling.generate import sample
    from latentpatch.training.trainer import train

    start = time.perf_counter()
    out = Path(opts.out)
    images, latents, run = out / "images", out / "latents", out / "run"
    prompts = list(DEMO_SOURCES)

    log(f"[1/4] writing {opts.per_caption} crops for each of {len(prompts)} captions to {images}")
    make_demo_images(images, opts.per_caption, opts.resolution, opts.seed)

    log(f"[2/4] encoding them with the shipped VAE (builtin) and the {opts.text_encoder} text encoder into {latents}")
    summary = encode(images, latents, "builtin", opts.resolution, device=opts.device,
                     text_encoder=opts.text_encoder, progress=opts.progress)
    for line in summary.lines():
        log("      " + line)

    cfg = load_config("demo", demo_overrides(opts))
    latest = latest_checkpoint(run)
    done = 0 if latest is None else int(read_state(latest)["step"])
    if done >= opts.steps:
        log(f"[3/4] the patch DiT in {run} is already trained ({done} steps)")
    else:
        log(f"[3/4] training a text-conditioned patch DiT for {opts.steps} steps into {run}"
            + (f" (resuming at step {done})" if latest is not None else ""))
        result = train(None if latest is not None else cfg, latents, run, resume=latest is not None,
                       max_steps=opts.steps, device=opts.device, progress=opts.progress)
        log(f"      final loss {result.loss:.4f} after {result.step} steps")
        if result.summary():
            log(f"      {result.summary()}")

    log(f"[4/4] sampling {opts.samples_per_prompt} images for each prompt (guidance {opts.guidance})")
    imgs = sample(run, prompts=prompts, n=opts.samples_per_prompt, steps=opts.sample_steps,
                  guidance=opts.guidance, seed=opts.seed, out=out / "samples", output="tensor",
                  device=opts.device, progress=opts.progress)
    samples_png = out / "samples.png"
    save_image(imgs, samples_png, nrow=opts.samples_per_prompt, padding=2)
    loss_png = out / "loss.png"
    if (run / "loss.png").exists():
        shutil.copyfile(run / "loss.png", loss_png)
    return DemoResult(out, run, samples_png, loss_png, time.perf_counter() - start, prompts)
