"""Sampling a freshly wrapped SD3 / SD3.5 / FLUX.1 base with latentpatch's Euler sampler over the pipeline's own
schedule is the stock pipeline's output for the same initial noise, prompts and guidance."""

from __future__ import annotations

import pytest
import torch
from flow_helpers import LATENT_CHANNELS, SD3_SCHEDULER, load_pipeline, make_flux_pipeline, make_sd3_pipeline

from latentpatch.conditioning import Conditioning
from latentpatch.diffusion.flow_schedule import flow_time
from latentpatch.models.flow_base import load_flow_base
from latentpatch.sampling.latents import generate_latents

PROMPTS = ["red brick wall", "a photo of a cat sitting on a wooden table"]
SEEDS = [3, 11]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("flow-pipelines")
    return {"sd3": make_sd3_pipeline(root / "sd3"), "sd35": make_sd3_pipeline(root / "sd35", sd35=True),
            "flux": make_flux_pipeline(root / "flux"), "schnell": make_flux_pipeline(root / "schnell", False)}


def _noise(h: int, w: int) -> torch.Tensor:
    """The initial noise latentpatch draws for SEEDS (one CPU generator per image): the pipeline's `latents`."""
    return torch.stack([torch.randn(LATENT_CHANNELS, h, w, generator=torch.Generator().manual_seed(s)) for s in SEEDS])


@pytest.mark.parametrize("name", ["sd3", "sd35"])
def test_sd3_sampling_is_the_pipelines(folders, name):
    h, w, steps, scale = 12, 8, 4, 5.0
    pipe = load_pipeline(folders[name])
    with torch.no_grad():
        emb, neg, pooled, neg_pooled = pipe.encode_prompt(PROMPTS, None, None, do_classifier_free_guidance=True,
                                                          max_sequence_length=16)
        want = pipe(prompt_embeds=emb, negative_prompt_embeds=neg, pooled_prompt_embeds=pooled,
                    negative_pooled_prompt_embeds=neg_pooled, latents=_noise(h, w), height=2 * h, width=2 * w,
                    num_inference_steps=steps, guidance_scale=scale, output_type="latent").images
    base = load_flow_base(folders[name])
    got = generate_latents(base.precond, SEEDS, (LATENT_CHANNELS, h, w), Conditioning(text_tokens=emb,
                           text_pooled=pooled), Conditioning(text_tokens=neg, text_pooled=neg_pooled),
                           sampler="euler", guidance=scale, sigmas=base.sampling_sigmas(steps, (h, w)))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(got[0], got[1], atol=1e-2)


@pytest.mark.parametrize("name,scale", [("flux", 3.5), ("schnell", 0.0)])
def test_flux_sampling_is_the_pipelines(folders, name, scale):
    """FLUX.1-dev's guidance is its distilled guidance input (no classifier-free guidance: latentpatch's scale 1);
    schnell has none. The pipeline's latents are packed; unpacked they are latentpatch's."""
    from diffusers import FluxPipeline

    h, w, steps = 8, 12, 4
    pipe = load_pipeline(folders[name])
    noise = _noise(h, w)
    with torch.no_grad():
        emb, pooled, _ = pipe.encode_prompt(PROMPTS, None, max_sequence_length=16)
        packed = pipe(prompt_embeds=emb, pooled_prompt_embeds=pooled, height=2 * h, width=2 * w,
                      latents=FluxPipeline._pack_latents(noise, 2, LATENT_CHANNELS, h, w), num_inference_steps=steps,
                      guidance_scale=scale, output_type="latent").images
    want = FluxPipeline._unpack_latents(packed, 2 * h, 2 * w, pipe.vae_scale_factor)
    base = load_flow_base(folders[name], guidance_scale=scale)
    got = generate_latents(base.precond, SEEDS, (LATENT_CHANNELS, h, w), Conditioning(text_tokens=emb,
                           text_pooled=pooled), sampler="euler", sigmas=base.sampling_sigmas(steps, (h, w)))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_the_exported_flux_pipelines_cache_line_gives_latentpatchs_step_cache(folders):
    """The line a FLUX export's README gives (diffusers' own TaylorSeer in FluxPipeline, whose calls name a cache
    context) makes the latents of latentpatch's `--cache step` with the same settings, not the uncached ones."""
    from diffusers import FluxPipeline, TaylorSeerCacheConfig

    from latentpatch.exporting.stock_flow_pipeline import cache_call
    from latentpatch.sampling.caches import job_cache

    h, w, steps, spec = 8, 8, 8, "step:interval=2,order=1,warmup=2"
    pipe = load_pipeline(folders["flux"])
    exec(cache_call(spec), {"pipe": pipe, "torch": torch, "TaylorSeerCacheConfig": TaylorSeerCacheConfig})
    noise = _noise(h, w)
    with torch.no_grad():
        emb, pooled, _ = pipe.encode_prompt(PROMPTS, None, max_sequence_length=16)
        packed = pipe(prompt_embeds=emb, pooled_prompt_embeds=pooled, height=2 * h, width=2 * w,
                      latents=FluxPipeline._pack_latents(noise, 2, LATENT_CHANNELS, h, w), num_inference_steps=steps,
                      guidance_scale=3.5, output_type="latent").images
    want = FluxPipeline._unpack_latents(packed, 2 * h, 2 * w, pipe.vae_scale_factor)
    base = load_flow_base(folders["flux"], guidance_scale=3.5)
    cond = Conditioning(text_tokens=emb, text_pooled=pooled)
    args = dict(sampler="euler", sigmas=base.sampling_sigmas(steps, (h, w)))
    with job_cache(base.precond, spec) as cache:
        got = generate_latents(cache.fresh(), SEEDS, (LATENT_CHANNELS, h, w), cond, **args)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    uncached = generate_latents(base.precond, SEEDS, (LATENT_CHANNELS, h, w), cond, **args)
    assert (got - uncached).abs().max() > 1e-3  # the cache moved the latents: the match is the cache's


def test_the_schedules_are_the_pipelines_set_timesteps():
    """SD3: set_timesteps(steps) with the fixed shift 3; FLUX: sigmas linspace(1, 1/steps) shifted by mu of the
    image's tokens, so a larger image keeps more noise at every step."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from latentpatch.diffusion.flow_schedule import pipeline_sigmas

    scheduler = FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER)
    scheduler.set_timesteps(7)
    sd3 = pipeline_sigmas(SD3_SCHEDULER, 7, (64, 64), "StableDiffusion3Pipeline")
    assert torch.equal(flow_time(sd3).to(torch.float32), scheduler.sigmas)
    from flow_helpers import FLUX_SCHEDULER

    small = flow_time(pipeline_sigmas(FLUX_SCHEDULER, 7, (32, 32), "FluxPipeline")).to(torch.float32)
    large = flow_time(pipeline_sigmas(FLUX_SCHEDULER, 7, (128, 128), "FluxPipeline")).to(torch.float32)
    assert small[0] == large[0] == 1.0 and small[-1] == large[-1] == 0.0
    assert bool((large[1:-1] > small[1:-1]).all())


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_prompts_through_latentpatchs_encoder_sample_as_the_pipeline_does(folders, name):
    """End to end: the pipeline's text encoders as a latentpatch encoder, the request's conditioning (the prompt
    and, for guidance, the empty caption), the base's schedule, Euler: the pipeline's latents for those prompts."""
    from diffusers import FluxPipeline

    from latentpatch.conditioning import ConditioningSpec
    from latentpatch.conditioning.requested import request_conditioning
    from latentpatch.text.loader import load_text_encoder

    h, w, steps = 8, 8, 3
    flux = name == "flux"
    encoder = load_text_encoder(f"transformers:{folders[name]}", max_length=32, device="cpu")
    spec = ConditioningSpec(text_encoder=encoder.record, pooled=True)
    cond, uncond = request_conditioning(spec, encoder, PROMPTS)
    base = load_flow_base(folders[name], guidance_scale=3.5)
    got = generate_latents(base.precond, SEEDS, (LATENT_CHANNELS, h, w), cond, uncond, sampler="euler",
                           guidance=1.0 if flux else 4.0, sigmas=base.sampling_sigmas(steps, (h, w)))
    pipe = load_pipeline(folders[name])
    noise = _noise(h, w)
    latents = FluxPipeline._pack_latents(noise, 2, LATENT_CHANNELS, h, w) if flux else noise
    with torch.no_grad():
        want = pipe(prompt=PROMPTS, height=2 * h, width=2 * w, latents=latents, num_inference_steps=steps,
                    guidance_scale=3.5 if flux else 4.0, max_sequence_length=32, output_type="latent").images
    if flux:
        want = FluxPipeline._unpack_latents(want, 2 * h, 2 * w, pipe.vae_scale_factor)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
