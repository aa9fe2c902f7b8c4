"""The sample stage's options: one dataclass with the defaults, checked once, shared by `lp.sample`, the
`latentpatch sample` and `eval` commands, the job file a job writes and the training previews.

The noise range (sigma_min, sigma_max) is not an option: it is the run's own (its `edm` config). `size` is
checked here for its form only; whether it fits a run is latentpatch.sampling.shape's to say.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any

from latentpatch.diffusion.samplers import get_sampler
from latentpatch.errors import UserError


@dataclass(frozen=True)
class SampleOptions:
    """How a job samples; batch_size alone does not change the pixels (per-image noise generators)."""

    steps: int = 18          # noise levels of the Karras schedule (Heun: 2 * steps - 1 network calls)
    sampler: str = "heun"    # heun (EDM), euler or dpmpp_2m (latentpatch.diffusion.samplers)
    guidance: float = 1.0    # classifier-free guidance scale: 1 = none, 0 = unconditional
    churn: float = 0.0       # EDM's S_churn (heun / euler)
    seed: int = 0            # image i's noise comes from image_seed(seed, i)
    batch_size: int = 16
    size: tuple[int, int] | None = None  # (H, W) pixels, H first as torch writes shapes (N: N x N); None: the run's

    def __post_init__(self) -> None:
        # One spelling per size, so SampleOptions(size=16) == SampleOptions(size=(16, 16)); bad forms stay for check.
        size = self.size
        if _whole(size):
            object.__setattr__(self, "size", (int(size), int(size)))
        elif isinstance(size, (list, tuple)) and len(size) == 2 and all(_whole(s) for s in size):
            object.__setattr__(self, "size", (int(size[0]), int(size[1])))

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

    def job_settings(self) -> dict[str, Any]:
        """The options that decide the pixels, as a job file (job.json) and each PNG record them; `size` only
        when one is asked, so a job at the run's own shape writes the job.json it always did."""
        settings = {"sampler": self.sampler, "steps": int(self.steps), "guidance": float(self.guidance),
                    "churn": float(self.churn), "seed": int(self.seed)}
        if self.size is not None:
            settings["size"] = [int(s) for s in self.size]
        return settings

    @classmethod
    def from_job_settings(cls, settings: dict[str, Any]) -> SampleOptions:
        """The options a job file recorded (every job.json format so far holds these five keys; "size" when one
        was asked)."""
        size = settings.get("size")
        return cls(steps=int(settings["steps"]), sampler=settings["sampler"], guidance=float(settings["guidance"]),
                   churn=float(settings["churn"]), seed=int(settings["seed"]),
                   size=None if size is None else (int(size[0]), int(size[1])))


def _whole(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


DEFAULTS = SampleOptions()
