"""EDM's Heun sampler (Karras et al. 2022, Algorithm 2 with S_churn = 0) as a diffusers scheduler.

diffusers has EDM's Euler step (EDMEulerScheduler: Karras sigmas, EDM's c_in, c_noise, c_skip and c_out) but
no EDM Heun: HeunDiscreteScheduler reads a VP network (input x / sqrt(1 + sigma^2), a DDPM timestep, no
sigma_data). This subclass keeps everything of EDMEulerScheduler and adds the trapezoidal correction the way
HeunDiscreteScheduler lays it out: every noise level but the first appears twice in `timesteps` (order 2), so
the standard loop `scale_model_input` -> network -> `step` runs 2 * steps - 1 network calls, and the last step
into sigma = 0 is a plain Euler step, as in Algorithm 2.

Shipped in `scheduler/` of a `latentpatch export` folder; it imports torch and diffusers only.
"""

from __future__ import annotations

import torch
from diffusers.schedulers.scheduling_edm_euler import EDMEulerScheduler, EDMEulerSchedulerOutput


class EDMHeunScheduler(EDMEulerScheduler):
    """EDMEulerScheduler's config and preconditioning, 2nd-order (Heun) steps."""

    order = 2

    def set_timesteps(self, num_inference_steps: int = None, device: str | torch.device = None,
                      sigmas: torch.Tensor | list[float] | None = None) -> None:
        super().set_timesteps(num_inference_steps, device, sigmas)
        s = self.sigmas  # [n + 1], the last 0
        self.sigmas = torch.cat([s[:1], s[1:-1].repeat_interleave(2), s[-1:]])
        self.timesteps = self.precondition_noise(self.sigmas[:-1])
        if device is not None:
            self.timesteps = self.timesteps.to(device)
        self._euler = None  # (x_i, d_i, sigma_i, sigma_{i+1}) between an Euler step and its correction

    @property
    def state_in_first_order(self) -> bool:
        return getattr(self, "_euler", None) is None

    def step(self, model_output: torch.Tensor, timestep: float | torch.Tensor, sample: torch.Tensor,
             generator: torch.Generator | None = None, return_dict: bool = True) -> EDMEulerSchedulerOutput | tuple:
        """An Euler step from sigma_i (first call), then the correction at sigma_{i+1} (second call)."""
        if self.step_index is None:
            self._init_step_index(timestep)
        sample = sample.to(torch.float32)
        sigma = self.sigmas[self.step_index]
        denoised = self.precondition_outputs(sample, model_output.to(torch.float32), sigma)
        derivative = (sample - denoised) / sigma
        if self.state_in_first_order:
            sigma_next = self.sigmas[self.step_index + 1]
            prev_sample = sample + (sigma_next - sigma) * derivative
            if sigma_next > 0:  # Algorithm 2 line 8: no correction into sigma = 0
                self._euler = (sample, derivative, sigma, sigma_next)
        else:
            x_i, d_i, sigma_i, sigma_next = self._euler
            prev_sample = x_i + (sigma_next - sigma_i) * (0.5 * d_i + 0.5 * derivative)
            self._euler = None
        self._step_index += 1
        prev_sample = prev_sample.to(model_output.dtype)
        if not return_dict:
            return prev_sample, denoised
        return EDMEulerSchedulerOutput(prev_sample=prev_sample, pred_original_sample=denoised)
