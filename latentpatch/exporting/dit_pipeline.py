"""The export target for a DiT fine-tune whose transformer stayed stock (the crop's place in its own position table,
no coordinate channels): diffusers' own DiTPipeline, loaded with `DiTPipeline.from_pretrained(OUT)`, no remote code.

    OUT/model_index.json   DiTPipeline, its components, id2label (the run's class names, for pipe.get_label_ids)
    OUT/transformer/       the stock DiTTransformer2DModel with the run's weights (LoRA adapters merged)
    OUT/scheduler/         DDIMScheduler (--sampler euler, the default) or DPMSolverMultistepScheduler (dpmpp_2m)
    OUT/vae/               the run's autoencoder, its scaling factor in its config

DiTPipeline does some things its own way, and a run it cannot reproduce goes to the coordinate pipeline instead
(which serves a stock DiT too): it starts from unit noise and never scales it by the scheduler's init_noise_sigma,
so only schedulers that step x_t in the VP space run in it (DDIM, DPM-Solver; not Euler/Heun-discrete); its
unconditional label is 1000, ImageNet's null class, so it serves DiTs of 1000 classes (DiT-XL/2's); it samples the
square transformer.config.sample_size; it decodes latents / scaling_factor, without a shift. Guidance: it guides
eps over all latent channels when guidance_scale > 1 (the original DiT code guides 3 of 4), which is
latentpatch's guidance of D = x - sigma eps; at guidance_scale <= 1 it runs the conditional model alone.

What its images equal: DDIM (eta 0) is Euler's method on the probability-flow ODE in x / sqrt(a_t) (latentpatch's
euler sampler), DPM-Solver++(2M) latentpatch's dpmpp_2m, each over the scheduler's own noise levels
(`pipeline_sigmas`) from x_T / sqrt(a_T) = noise * sqrt(1 + sigma_T^2). `latentpatch sample` takes Karras noise
levels between the run's sigma_min and sigma_max from noise * sigma_max: the same ODE, other steps.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from latentpatch.errors import UserError
from latentpatch.exporting.autoencoder import export_autoencoder
from latentpatch.exporting.folder import MODEL_INDEX
from latentpatch.exporting.network import export_network
from latentpatch.exporting.stock_flow_pipeline import stock_loader
from latentpatch.runs import LoadedRun

NULL_LABEL = 1000  # DiTPipeline's unconditional class, fixed
SCHEDULERS = {"euler": "DDIMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}
DEFAULT_SAMPLER = "euler"  # DDIM: the scheduler DiT-XL/2's pipeline ships


def serves(loaded: LoadedRun) -> bool:
    """A stock DiTTransformer2DModel under its own VP preconditioning, 1000 classes, a diffusers VAE without a
    shift, trained at the transformer's own square sample size."""
    cfg, info = loaded.cfg, loaded.info
    if cfg.model.arch != "pretrained" or cfg.model.pretrained.class_name != "DiTTransformer2DModel":
        return False
    net = loaded.precond.net
    ae = info["autoencoder"]
    c, h, w = (int(s) for s in info["latent_shape"])
    return (net.coordinate_inputs == 0 and cfg.edm.precond == "vp" and loaded.spec.num_classes == NULL_LABEL
            and ae["kind"] != "pixel" and float(ae["shift_factor"]) == 0.0
            and h == w == int(net.transformer.config.sample_size))


def dit_scheduler(sampler: str, base: dict[str, Any]) -> Any:
    """The VP scheduler of the base's noise schedule that takes `sampler`'s steps from DiTPipeline's unit noise:
    deterministic, no clipping or thresholding (latentpatch's samplers have neither), eps or v as the base reads."""
    import diffusers

    from latentpatch.diffusion.vp import prediction_type, schedule_sigmas

    if sampler not in SCHEDULERS:
        raise UserError(f"--sampler {sampler}: DiTPipeline starts from unit noise and steps a VP scheduler, so a stock "
                        "DiT export takes euler (DDIMScheduler, the default) or dpmpp_2m (DPMSolverMultistepScheduler)")
    config = {k: v for k, v in base.items() if not k.startswith("_")}
    common = dict(prediction_type=prediction_type(base), clip_sample=False, thresholding=False)
    if sampler == "euler":
        scheduler = diffusers.DDIMScheduler.from_config(config, **common)
    else:
        common.pop("clip_sample")
        scheduler = diffusers.DPMSolverMultistepScheduler.from_config(
            config, algorithm_type="dpmsolver++", solver_order=2, final_sigmas_type="zero", use_karras_sigmas=False,
            variance_type=None, **common)  # variance_type None: DiTPipeline hands it eps, learned sigma split off
    a = scheduler.alphas_cumprod.to(torch.float32).clamp(min=2**-24)
    if not torch.allclose(((1 - a) / a) ** 0.5, schedule_sigmas(base), rtol=1e-6, atol=0):
        raise UserError(f"diffusers' {type(scheduler).__name__} builds other noise levels from this run's edm.scheduler "
                        f"({base.get('_class_name')}) than the run was trained with")
    return scheduler


def pipeline_sigmas(scheduler: Any, steps: int) -> tuple[torch.Tensor, float]:
    """(EDM noise levels [steps + 1] float64, the last one where the pipeline stops) that an exported scheduler steps
    through for `steps` inference steps, and the factor its unit starting noise has in EDM's x: sqrt(1 + sigma_T^2).
    latentpatch's euler (DDIM) or dpmpp_2m (DPM-Solver++) over these sigmas from noise * factor is its image."""
    from latentpatch.diffusion.vp import vp_sigmas

    scheduler.set_timesteps(steps)
    levels = vp_sigmas(scheduler.alphas_cumprod)[scheduler.timesteps.long()].double()
    if type(scheduler).__name__ == "DDIMScheduler":  # its last step lands on final_alpha_cumprod (1: sigma 0)
        end = vp_sigmas(torch.as_tensor(scheduler.final_alpha_cumprod)).double().reshape(1)
    else:
        end = levels.new_zeros(1)  # final_sigmas_type "zero"
    return torch.cat([levels, end]), float((1 + levels[0] ** 2).sqrt())


def write(loaded: LoadedRun, folder: Path, sampler: str, lora: str | None) -> dict[str, Any]:
    """DiTPipeline(transformer, vae, scheduler).save_pretrained(folder), id2label added; what was written."""
    from diffusers import DiTPipeline

    scheduler = dit_scheduler(sampler, loaded.cfg.edm.scheduler)
    network = export_network(loaded.precond.net)
    ae = export_autoencoder(loaded.info["autoencoder"])
    DiTPipeline(transformer=network.model, vae=ae.vae, scheduler=scheduler).save_pretrained(folder)
    names = loaded.spec.class_names or tuple(str(k) for k in range(NULL_LABEL))
    index = json.loads((folder / MODEL_INDEX).read_text())
    index["id2label"] = {str(k): name for k, name in enumerate(names)}  # DiTPipeline(id2label=...) reads it
    (folder / MODEL_INDEX).write_text(json.dumps(index, indent=2) + "\n")
    entries = {k: v for k, v in index.items() if isinstance(v, list)}
    return {"pipeline": "DiTPipeline", "network": type(network.model).__name__, "scheduler": type(scheduler).__name__,
            "sampler": sampler, "lora": lora, "coordinate_scale": "none: the DiT's own sin-cos position table",
            "components": entries, "pipeline_config": {"id2label": f"{len(names)} class names"},
            "example_call": "class_labels=[0], guidance_scale=4.0",
            "load": stock_loader("DiTPipeline"),
            "about": "A DiT fine-tuned by latentpatch with Patch Diffusion: each crop took its place from the DiT's own "
                     "sin-cos position table, so the weights stayed stock and this is a plain DiTPipeline folder."}
