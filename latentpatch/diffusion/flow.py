"""Flow matching as SD3 and FLUX.1 were trained, as an x0-denoiser in EDM's variables.

The base was trained on x_t = (1 - t) x0 + t eps with its output read as the velocity v = eps - x0 (Esser et
al. 2024, "Scaling Rectified Flow Transformers", eq. 1 and Sec. 2). With sigma = t / (1 - t) and
x = x_t / (1 - t) = x0 + sigma eps this is EDM's x (Karras et al. 2022, eq. 1), so

    D(x; sigma) = x_t - t v(x_t, t),   x_t = x / (1 + sigma),   t = sigma / (1 + sigma)

is the base's own x0 estimate, and every EDM sampler, guidance, held-out loss and evaluation runs over it
unchanged. (An Euler step in sigma is an Euler step in t: both move x along the line through D and
eps_hat = (x - D) / sigma; tests/test_flow_objective.py checks it.) The network is told timestep t * 1000,
the scheduler's timestep, as both pipelines tell it (FLUX's network divides by 1000 again, as FluxPipeline).

Training follows diffusers' examples (examples/dreambooth/train_dreambooth{,_lora}_{sd3,flux}.py and
training_utils.py), options `FlowConfig`:
- noise levels: u = compute_density_for_timestep_sampling(weighting_scheme, logit_mean, logit_std, mode_scale)
  (logit_normal: sigmoid(N(m, s^2)); mode: the SD3 paper's mode density with mode_scale; cosmap, sigma_sqrt,
  none: uniform), index = floor(u * num_train_timesteps), t = the scheduler's training table at that index
  (FlowMatchEulerDiscreteScheduler.sigmas: `shift` applied unless it shifts dynamically);
- the loss: compute_loss_weighting_for_sd3(weighting_scheme, t) * mean((pred - target)^2) per sample, pred the
  velocity and target eps - x0, or with precondition_outputs pred = x_t - t v and target x0 (the SD3 examples'
  default, --precondition_outputs 1; FLUX's examples use the velocity);
- FLUX.1-dev's distilled guidance input: args.guidance_scale (3.5) for every sample (latentpatch.models.flux).
What is done differently:
- resolution_shift (default on): where the scheduler shifts dynamically (FLUX: use_dynamic_shifting) the drawn
  t is moved by scheduler.time_shift with mu = calculate_shift(the FULL image's token count), as FluxPipeline
  samples; the diffusers FLUX examples draw from the unshifted table (resolution_shift=False reproduces them).
  A crop is shifted by its full image's tokens, never its own.
- the index is clamped to the table (u = 1 exactly, possible under "mode" and in float32 rounding, is out of
  range in the examples);
- x_t is formed in float64 and given to the network in float32, the loss is float32 (the examples form x_t in
  the weight dtype, bf16 under mixed precision); prior preservation and the text-encoder training of the
  examples are not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from latentpatch.diffusion.flow_schedule import (
    edm_sigma,
    flow_scheduler,
    flow_time,
    shifted_table_levels,
    uniform_to_u,
)
from latentpatch.errors import UserError

WEIGHTING_SCHEMES = ("logit_normal", "mode", "cosmap", "sigma_sqrt", "none")


@dataclass
class FlowConfig:
    """The training objective's options, named as diffusers' training examples name them."""

    weighting_scheme: str = "logit_normal"  # the SD3 examples' default; the FLUX examples': "none" (uniform)
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    precondition_outputs: bool = True  # loss on x0 = x_t - t v (SD3 examples); False: on the velocity (FLUX)
    resolution_shift: bool = True  # a dynamically shifting scheduler's shift from the full image's tokens

    def check(self) -> None:
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise UserError(f"flow.weighting_scheme must be one of {', '.join(WEIGHTING_SCHEMES)}, got "
                            f"{self.weighting_scheme!r}")
        if not self.logit_std > 0:
            raise UserError(f"flow.logit_std must be > 0, got {self.logit_std}")


# Each diffusers example's defaults (train_dreambooth{,_lora}_sd3.py / _flux.py).
SD3_DEFAULTS = FlowConfig()
FLUX_DEFAULTS = FlowConfig(weighting_scheme="none", precondition_outputs=False)


class FlowPrecond(nn.Module):
    """D(x; sigma) = x_t - t F(x_t, coords; 1000 t) of a velocity network F (module docstring).

    Same call signature and state-dict keys (`net.*`) as EDMPrecond; `net(x_t[B, C+2, h, w], timestep[B], cond)`
    returns the velocity and may run under autocast. The conversions run in float64 and D is float32;
    `output="velocity"` returns F itself (the training loss on the velocity, through the same forward).
    """

    def __init__(self, net: nn.Module, num_train_timesteps: int = 1000) -> None:
        super().__init__()
        self.net = net
        self.num_train_timesteps = int(num_train_timesteps)

    def forward(self, x: Tensor, sigma: Tensor | float, coords: Tensor, cond=None, *, output: str = "x0",
                **net_kwargs) -> Tensor:
        x = x.to(torch.float64)
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device).reshape(-1, 1, 1, 1)
        sigma = sigma.expand(x.shape[0], 1, 1, 1)
        t = flow_time(sigma)
        x_t = x / (1 + sigma)
        timestep = t.flatten().to(torch.float32) * self.num_train_timesteps  # the scheduler's float32 timesteps
        net_in = torch.cat([x_t.to(torch.float32), coords.to(torch.float32)], dim=1)
        v = self.net(net_in, timestep, cond, **net_kwargs).to(torch.float32)
        if output == "velocity":
            return v
        if output != "x0":
            raise ValueError(f"output must be 'x0' or 'velocity', got {output!r}")
        return (x_t - t * v.to(torch.float64)).to(torch.float32)


class FlowMatching:
    """The objective of a flow-matching base: training noise levels, the per-sample loss and a held-out grid.

    `scheduler`: the base's scheduler_config.json; `patch`: latent pixels per token side (SD3's patch_size,
    FLUX's 2x2 packing), which counts an image's tokens for the resolution-dependent shift.
    """

    def __init__(self, cfg: FlowConfig, scheduler: dict[str, Any], patch: int = 2) -> None:
        cfg.check()
        self.cfg, self.patch = cfg, int(patch)
        self.scheduler = flow_scheduler(scheduler)
        self.table = self.scheduler.sigmas.to(torch.float32)  # the training table: 1 ... 1/N (shifted unless dynamic)
        self.num_train_timesteps = int(self.scheduler.config.num_train_timesteps)

    def _levels(self, u: Tensor, full_shapes: Tensor | None) -> Tensor:
        """u in [0, 1) -> EDM sigmas (float64): the table at floor(u N), then the full image's shift."""
        index = (u * self.num_train_timesteps).long().clamp(0, len(self.table) - 1)
        t = self.table[index.cpu()]
        if self.cfg.resolution_shift:
            t = shifted_table_levels(self.scheduler, t, full_shapes, self.patch)
        return edm_sigma(t)

    def draw_sigmas(self, n: int, generator: torch.Generator | None = None, device=None,
                    full_shapes: Tensor | None = None) -> Tensor:
        """n training noise levels [n] float64 on `device`, drawn as diffusers' examples draw them (module
        docstring); `full_shapes` [n, 2]: each sample's FULL latent (h, w), crop or not. Keep them float64:
        t = sigma / (1 + sigma) then gives the table's float32 t back exactly."""
        from diffusers.training_utils import compute_density_for_timestep_sampling

        cfg = self.cfg
        draw_device = generator.device if generator is not None else (device or "cpu")
        u = compute_density_for_timestep_sampling(weighting_scheme=cfg.weighting_scheme, batch_size=n,
                                                  logit_mean=cfg.logit_mean, logit_std=cfg.logit_std,
                                                  mode_scale=cfg.mode_scale, device=draw_device, generator=generator)
        shapes = None if full_shapes is None else torch.as_tensor(full_shapes).reshape(n, 2).cpu()
        return self._levels(u.cpu(), shapes).to(device or "cpu")

    def heldout_sigmas(self, n: int = 8, full_shape: tuple[int, int] | None = None) -> Tensor:
        """n noise levels [n] float64, ascending: the mid-quantiles (k + 1/2)/n of the training levels of an image
        of `full_shape` (h, w) (its shift; any shape when the scheduler does not shift dynamically)."""
        if n < 1:
            raise ValueError(f"heldout_sigmas needs n >= 1, got {n}")
        strata = 1 << 16  # a stratified uniform: each level's probability to 1/65536
        q = (torch.arange(strata, dtype=torch.float64) + 0.5) / strata
        u = uniform_to_u(q, self.cfg.weighting_scheme, self.cfg.logit_mean, self.cfg.logit_std, self.cfg.mode_scale)
        shapes = None if full_shape is None else torch.tensor([list(full_shape)]).expand(strata, 2)
        levels = self._levels(u, shapes).sort().values
        return levels[((torch.arange(n, dtype=torch.float64) + 0.5) / n * strata).long()]

    def weighting(self, t: Tensor) -> Tensor:
        """compute_loss_weighting_for_sd3(weighting_scheme, t): 1/t^2 (sigma_sqrt), cosmap's, else 1."""
        from diffusers.training_utils import compute_loss_weighting_for_sd3

        return compute_loss_weighting_for_sd3(weighting_scheme=self.cfg.weighting_scheme, sigmas=t)

    def loss(self, precond: nn.Module, x0: Tensor, coords: Tensor, sigma: Tensor, noise: Tensor, cond=None,
             **net_kwargs) -> Tensor:
        """Per-sample loss [n] of the examples for x_t = (1 - t) x0 + t noise: weighting(t) * mean((pred -
        target)^2), deterministic given `sigma` [n] (EDM's) and `noise`; `precond` is a FlowPrecond (or a wrapper
        of one: DDP, compile), called once."""
        s = sigma.to(device=x0.device, dtype=torch.float64).reshape(-1, 1, 1, 1)
        x = x0.to(torch.float64) + s * noise.to(device=x0.device, dtype=torch.float64)
        if self.cfg.precondition_outputs:
            pred = precond(x, s.flatten(), coords, cond, **net_kwargs)
            target = x0.to(torch.float32)
        else:
            pred = precond(x, s.flatten(), coords, cond, output="velocity", **net_kwargs)
            target = (noise.to(device=x0.device, dtype=torch.float32) - x0.to(torch.float32))
        weight = self.weighting(flow_time(s).to(torch.float32))
        return torch.mean((weight * (pred - target) ** 2).reshape(len(x0), -1), 1)


__all__ = ["FLUX_DEFAULTS", "FlowConfig", "FlowMatching", "FlowPrecond", "SD3_DEFAULTS", "WEIGHTING_SCHEMES"]
