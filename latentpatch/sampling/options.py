"""The sample stage's options: one dataclass with the defaults, checked once, shared by `lp.sample`, the
`latentpatch sample` and `eval` commands, the job file a job writes and the training previews.

The noise range (sigma_min, sigma_max) is not an option: it is the run's own (its `edm` config). `size` is
checked here for its form only; whether it fits a run is latentpatch.sampling.shape's to say.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field
from typing import Any

from latentpatch.diffusion.samplers import get_sampler
from latentpatch.errors import UserError
from latentpatch.sampling.caches.spec import cache_help, canonical_cache, parse_cache


def _option(default: Any, help: str) -> Any:
    """A field with the help the commands show (cli/options.py makes one --flag of each field)."""
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class SampleOptions:
    """How a job samples; batch_size alone does not change the pixels (per-image noise generators). The one home
    of the sampling options: `lp.sample`, `evaluate_run`, the `sample` and `eval` commands and the job file."""

    steps: int = _option(18, "Noise levels of the Karras schedule (Heun uses 2*steps-1 network calls).")
    sampler: str = _option("heun", "heun (EDM, 2nd order), euler, or dpmpp_2m (DPM-Solver++ 2M).")
    guidance: float = _option(1.0, "Classifier-free guidance scale: 1 = none, 0 = unconditional, >1 = stronger.")
    churn: float = _option(0.0, "EDM stochastic churn S_churn (0 = deterministic ODE; heun/euler only).")
    seed: int = _option(0, "Image i's noise comes from a generator seeded by (seed, i), whatever the batch size "
                           "(eval also seeds its KID subsets and SWD projections with it).")
    batch_size: int = _option(16, "Images per network batch (does not change the images).")
    size: tuple[int, int] | None = _option(
        None, "Image size in pixels, WxH (width first, e.g. 64x32) or N for N x N; default: the run's training "
              "shape. Each side a multiple of the autoencoder's factor x the network's size multiple (DiT patch "
              "size, UNet downsampling); in Python size=(H, W), height first.")
    cache: str | None = _option(None, cache_help())

    def __post_init__(self) -> None:
        # One spelling per size, so SampleOptions(size=16) == SampleOptions(size=(16, 16)); bad forms stay for check.
        size = self.size
        if _whole(size):
            object.__setattr__(self, "size", (int(size), int(size)))
        elif isinstance(size, (list, tuple)) and len(size) == 2 and all(_whole(s) for s in size):
            object.__setattr__(self, "size", (int(size[0]), int(size[1])))
        object.__setattr__(self, "cache", canonical_cache(self.cache))  # one spelling per cache: job.json's

    def check(self) -> None:
        """UserError for options no sampler can run, before anything is loaded."""
        get_sampler(self.sampler)
        if not _whole(self.steps) or self.steps < 1:
            raise UserError(f"--steps must be a whole number >= 1, got {self.steps}")
        if not self.guidance >= 0:
            raise UserError(f"--guidance must be >= 0 (1 = no guidance, 0 = unconditional), got {self.guidance}")
        if not self.churn >= 0:
            raise UserError(f"--churn must be >= 0, got {self.churn}")
        if self.churn > 0 and self.sampler == "dpmpp_2m":
            raise UserError("the dpmpp_2m sampler is deterministic; use --churn with the heun or euler sampler")
        if not _whole(self.seed):
            raise UserError(f"--seed must be a whole number, got {self.seed!r}")
        if not _whole(self.batch_size) or self.batch_size < 1:
            raise UserError(f"--batch-size must be a whole number >= 1, got {self.batch_size}")
        if self.size is not None and not (isinstance(self.size, tuple) and len(self.size) == 2
                                          and all(_whole(s) for s in self.size)):
            raise UserError(f"size must be (H, W) in pixels (height first) or N for a square (--size WxH or N on "
                            f"the command line), got {self.size!r}")
        if self.cache is not None:
            parse_cache(self.cache)

    def job_settings(self) -> dict[str, Any]:
        """The options that decide the pixels, as a job file (job.json) and each PNG record them; `size` only
        when one is asked and `cache` when one is on, so a job at the run's own shape without a cache writes the
        job.json it always did."""
        settings = {"sampler": self.sampler, "steps": int(self.steps), "guidance": float(self.guidance),
                    "churn": float(self.churn), "seed": int(self.seed)}
        if self.size is not None:
            settings["size"] = [int(s) for s in self.size]
        if self.cache is not None:
            settings["cache"] = self.cache
        return settings

    @classmethod
    def from_job_settings(cls, settings: dict[str, Any]) -> SampleOptions:
        """The options a job file recorded (every job.json format so far holds these five keys; "size" when one
        was asked, "cache" when one was on)."""
        size = settings.get("size")
        return cls(steps=int(settings["steps"]), sampler=settings["sampler"], guidance=float(settings["guidance"]),
                   churn=float(settings["churn"]), seed=int(settings["seed"]),
                   size=None if size is None else (int(size[0]), int(size[1])), cache=settings.get("cache"))


def sample_options(options: SampleOptions | None = None, **settings: Any) -> SampleOptions:
    """`options` (default DEFAULTS) with `settings` (steps=..., guidance=...) in place: what `lp.sample(run, n,
    guidance=4)` and `evaluate_run(..., steps=32)` take; a name that is no sampling option is refused in one line."""
    names = [f.name for f in dataclasses.fields(SampleOptions)]
    unknown = sorted(set(settings) - set(names))
    if unknown:
        raise UserError(f"unknown sampling option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)}; the options "
                        f"are {', '.join(names)}")
    return dataclasses.replace(options or DEFAULTS, **settings)


def _whole(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


DEFAULTS = SampleOptions()
