"""The sample stage's options: one dataclass with the defaults, checked once, shared by `lp.sample`, the
`latentpatch sample` and `eval` commands, the job file a job writes and the training previews.

The noise range (sigma_min, sigma_max) is not an option: it is the run's own (its `edm` config).
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

    def job_settings(self) -> dict[str, Any]:
        """The options that decide the pixels, as a job file (job.json) and each PNG record them."""
        return {"sampler": self.sampler, "steps": int(self.steps), "guidance": float(self.guidance),
                "churn": float(self.churn), "seed": int(self.seed)}

    @classmethod
    def from_job_settings(cls, settings: dict[str, Any]) -> SampleOptions:
        """The options a job file recorded (every job.json format so far holds these five keys)."""
        return cls(steps=int(settings["steps"]), sampler=settings["sampler"], guidance=float(settings["guidance"]),
                   churn=float(settings["churn"]), seed=int(settings["seed"]))


DEFAULTS = SampleOptions()


def _whole(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
