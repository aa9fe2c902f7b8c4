"""The scheduler an export carries: the diffusers scheduler that takes the steps latentpatch's sampler takes.

EDM runs (models trained here): EDMEulerScheduler is latentpatch's Euler (Karras sigmas with the run's sigma_min,
sigma_max and rho 7, a final 0, EDM's c_in / c_noise / c_skip / c_out with the run's sigma_data);
EDMDPMSolverMultistepScheduler is its DPM-Solver++(2M) (tests/test_samplers.py); EDM's Heun has no diffusers
scheduler, so the folder ships EDMHeunScheduler (shipped/scheduling_edm_heun.py), EDMEulerScheduler plus the
correction step. Fine-tuned pretrained bases (edm.precond "vp", latentpatch/diffusion/vp.py): the base's noise
schedule in HeunDiscreteScheduler / EulerDiscreteScheduler with Karras sigmas between the run's sigma_min and
sigma_max; their c_in = 1/sqrt(1 + sigma^2), timestep interpolated in ln(sigma) and eps / v reading are VPPrecond's.
Churn (S_churn > 0) is not exported: diffusers' Euler adds the churn noise after the network has seen the
sample, where EDM's Algorithm 2 adds it before; the exported samplers are the deterministic ones.
"""

from __future__ import annotations

from typing import Any

import torch

from latentpatch.errors import UserError

VP_SAMPLERS = {"heun": "HeunDiscreteScheduler", "euler": "EulerDiscreteScheduler"}
EDM_SAMPLERS = {"heun": None, "euler": "EDMEulerScheduler", "dpmpp_2m": "EDMDPMSolverMultistepScheduler"}


def edm_scheduler(sampler: str, sigma_min: float, sigma_max: float, sigma_data: float) -> Any:
    """The EDM scheduler for `sampler` (None in EDM_SAMPLERS: the shipped EDMHeunScheduler)."""
    import diffusers

    from latentpatch.diffusion.samplers import KARRAS_RHO
    from latentpatch.exporting.shipped.scheduling_edm_heun import EDMHeunScheduler

    name = EDM_SAMPLERS[sampler]
    cls = EDMHeunScheduler if name is None else getattr(diffusers, name)
    return cls(sigma_min=float(sigma_min), sigma_max=float(sigma_max), sigma_data=float(sigma_data),
               sigma_schedule="karras", rho=KARRAS_RHO, prediction_type="epsilon", final_sigmas_type="zero")


def vp_scheduler(sampler: str, base: dict[str, Any], sigma_min: float, sigma_max: float) -> Any:
    """The base's own noise schedule in HeunDiscrete/EulerDiscrete with Karras sigmas over [sigma_min, sigma_max];
    refused when that class builds other noise levels than the run's VP preconditioning uses."""
    import diffusers

    from latentpatch.diffusion.vp import prediction_type, schedule_sigmas

    name = VP_SAMPLERS[sampler]
    config = {k: v for k, v in base.items() if not k.startswith("_")}
    scheduler = getattr(diffusers, name).from_config(config, use_karras_sigmas=True, timestep_spacing="linspace",
                                                     prediction_type=prediction_type(base))
    # HeunDiscreteScheduler has no sigma_min / sigma_max arguments, but its Karras schedule reads them from its config
    scheduler.register_to_config(sigma_min=float(sigma_min), sigma_max=float(sigma_max))
    a = scheduler.alphas_cumprod.to(torch.float32).clamp(min=2**-24)
    if not torch.allclose(((1 - a) / a) ** 0.5, schedule_sigmas(base), rtol=1e-6, atol=0):
        raise UserError(f"diffusers' {name} builds other noise levels from this run's edm.scheduler "
                        f"({base.get('_class_name')}) than the run samples with; export with another --sampler")
    return scheduler


def export_scheduler(edm: Any, sampler: str) -> Any:
    """The scheduler of a run's `edm` config (cfg.edm) for latentpatch's sampler `sampler`."""
    if edm.precond == "vp":
        if sampler not in VP_SAMPLERS:
            raise UserError(f"--sampler {sampler}: a fine-tuned pretrained base exports with heun or euler "
                            "(HeunDiscreteScheduler / EulerDiscreteScheduler over its own noise schedule); diffusers' "
                            "DPM-Solver++ starts from other noise than latentpatch's sampler")
        return vp_scheduler(sampler, edm.scheduler, edm.sigma_min, edm.sigma_max)
    if sampler not in EDM_SAMPLERS:
        raise UserError(f"--sampler must be one of {', '.join(EDM_SAMPLERS)}, got {sampler!r}")
    return edm_scheduler(sampler, edm.sigma_min, edm.sigma_max, edm.sigma_data)
