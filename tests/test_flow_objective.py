"""Flow matching in EDM's variables: the same ODE, the diffusers examples' training draws and loss, exactly."""

from __future__ import annotations

import math

import pytest
import torch
from flow_helpers import CLIP_WIDTHS, FLUX_SCHEDULER, LATENT_CHANNELS, SD3_SCHEDULER, T5_WIDTH, tiny_flux_transformer
from flow_helpers import tiny_sd3_transformer

from latentpatch.conditioning import Conditioning
from latentpatch.diffusion.flow import FLUX_DEFAULTS, FlowConfig, FlowMatching, FlowPrecond
from latentpatch.diffusion.flow_schedule import SIGMA_AT_T1, edm_sigma, flow_time, pipeline_sigmas, resolution_mu
from latentpatch.diffusion.samplers import sample_euler
from latentpatch.models.flux import FluxNetwork
from latentpatch.models.sd3 import SD3Network
from latentpatch.patches import full_coordinates


def _example_t(scheduler_config, scheme, n, seed):
    """diffusers' train_dreambooth_sd3.py / _flux.py: u from compute_density_for_timestep_sampling, indices into
    a copy of the scheduler's timesteps, get_sigmas' lookup of the sigma at each timestep."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.training_utils import compute_density_for_timestep_sampling

    noise_scheduler_copy = FlowMatchEulerDiscreteScheduler(**scheduler_config)
    u = compute_density_for_timestep_sampling(weighting_scheme=scheme, batch_size=n, logit_mean=0.0, logit_std=1.0,
                                              mode_scale=1.29, generator=torch.Generator().manual_seed(seed))
    indices = (u * noise_scheduler_copy.config.num_train_timesteps).long()
    timesteps = noise_scheduler_copy.timesteps[indices]
    schedule_timesteps = noise_scheduler_copy.timesteps
    step_indices = [(schedule_timesteps == t).nonzero().item() for t in timesteps]
    return noise_scheduler_copy.sigmas[step_indices].flatten(), timesteps


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "cosmap", "sigma_sqrt", "none"])
def test_sd3_training_draws_are_the_examples_draws(scheme):
    want, timesteps = _example_t(SD3_SCHEDULER, scheme, 64, seed=3)
    objective = FlowMatching(FlowConfig(weighting_scheme=scheme), SD3_SCHEDULER)
    sigma = objective.draw_sigmas(64, torch.Generator().manual_seed(3), full_shapes=torch.tensor([[16, 8]] * 64))
    assert sigma.dtype == torch.float64
    t = flow_time(sigma).to(torch.float32)
    assert torch.equal(t, want)
    assert torch.equal(t * 1000, timesteps)  # and the network is told the example's timesteps


def test_flux_draws_without_resolution_shift_are_the_examples_draws():
    want, _ = _example_t(FLUX_SCHEDULER, "none", 64, seed=5)
    objective = FlowMatching(FlowConfig(weighting_scheme="none", resolution_shift=False), FLUX_SCHEDULER)
    sigma = objective.draw_sigmas(64, torch.Generator().manual_seed(5), full_shapes=torch.tensor([[64, 64]] * 64))
    assert torch.equal(flow_time(sigma).to(torch.float32), want)


def test_flux_draws_shift_by_the_full_images_token_count():
    """The same draws moved by scheduler.time_shift with mu from each sample's FULL image: a 64x64 latent has
    1024 tokens, a 32x16 one 128, whatever size of crop is trained."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    unshifted, _ = _example_t(FLUX_SCHEDULER, "none", 4, seed=7)
    objective = FlowMatching(FLUX_DEFAULTS, FLUX_SCHEDULER)
    shapes = torch.tensor([[64, 64], [32, 16], [64, 64], [32, 16]])
    t = flow_time(objective.draw_sigmas(4, torch.Generator().manual_seed(7), full_shapes=shapes)).to(torch.float32)
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER)
    for i, tokens in enumerate([1024, 128, 1024, 128]):
        mu = 0.5 + (1.15 - 0.5) / (4096 - 256) * (tokens - 256)  # calculate_shift, written out
        assert resolution_mu(scheduler, tokens) == pytest.approx(mu, abs=1e-12)
        want = math.exp(mu) / (math.exp(mu) + (1 / unshifted[i].double() - 1))
        assert float(t[i]) == pytest.approx(float(want), rel=1e-6)
    large = objective.draw_sigmas(4, torch.Generator().manual_seed(7), full_shapes=torch.tensor([[64, 64]] * 4))
    small = objective.draw_sigmas(4, torch.Generator().manual_seed(7), full_shapes=torch.tensor([[32, 16]] * 4))
    assert bool((large > small).all()) and bool((flow_time(small) > unshifted).all())  # more tokens, more noise


def test_t_of_one_stands_as_a_finite_sigma_that_maps_back_exactly():
    assert float(edm_sigma(torch.tensor([1.0]))) == SIGMA_AT_T1
    assert flow_time(torch.tensor([SIGMA_AT_T1], dtype=torch.float64)).to(torch.float32).item() == 1.0
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    x_t = (noise.double() * SIGMA_AT_T1 / (1 + SIGMA_AT_T1)).to(torch.float32)  # FlowPrecond's x_t at t = 1
    assert torch.equal(x_t, noise)


def _sd3_precond():
    return FlowPrecond(SD3Network(tiny_sd3_transformer())).eval()


def _cond(b, pooled=sum(CLIP_WIDTHS), seed=1):
    g = torch.Generator().manual_seed(seed)
    return Conditioning(text_tokens=torch.randn(b, 5, T5_WIDTH, generator=g),
                        text_pooled=torch.randn(b, pooled, generator=g))


def test_one_euler_step_in_sigma_is_the_schedulers_euler_step_in_t():
    """latentpatch's Euler step over D(x; sigma) from sigma_0 to sigma_1, read back as x_t = x / (1 + sigma), is
    FlowMatchEulerDiscreteScheduler.step's x_t + (t_1 - t_0) v, for every step of a schedule starting at t = 1."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    precond, cond = _sd3_precond(), _cond(2)
    coords = full_coordinates(2, 8, 8)
    scheduler = FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER)
    scheduler.set_timesteps(5)
    x_t = torch.randn(2, LATENT_CHANNELS, 8, 8, generator=torch.Generator().manual_seed(2))
    sigmas = edm_sigma(scheduler.sigmas)
    with torch.no_grad():
        for i, timestep in enumerate(scheduler.timesteps):
            v = precond.net(torch.cat([x_t, coords], 1), timestep.expand(2), cond)
            want = scheduler.step(v, timestep, x_t, return_dict=False)[0]
            x = x_t.double() * (1 + sigmas[i])
            got = sample_euler(lambda x_, s: precond(x_, s, coords, cond), x, sigmas[i:i + 2])
            got = got / (1 + sigmas[i + 1])
            torch.testing.assert_close(got.float(), want, rtol=1e-5, atol=1e-5)
            x_t = want


def test_a_whole_euler_trajectory_in_sigma_follows_the_flow_ode():
    """Integrating dx/dsigma = (x - D)/sigma over a schedule lands where integrating dx_t/dt = v with the same
    steps lands, with the same noise: the two ODEs are one."""
    precond, cond = _sd3_precond(), _cond(1)
    coords = full_coordinates(1, 8, 8)
    sigmas = pipeline_sigmas(SD3_SCHEDULER, 6, (8, 8), "StableDiffusion3Pipeline")
    t = flow_time(sigmas)
    noise = torch.randn(1, LATENT_CHANNELS, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        x = sample_euler(lambda x_, s: precond(x_, s, coords, cond), noise.double() * sigmas[0], sigmas)
        x_t = noise.double()
        for i in range(len(t) - 1):
            v = precond.net(torch.cat([x_t.float(), coords], 1), (t[i] * 1000).float().expand(1), cond)
            x_t = x_t + (t[i + 1] - t[i]) * v.double()
    torch.testing.assert_close(x, x_t, rtol=1e-5, atol=1e-5)


def _example_loss(model_pred, x0, noise, t, scheme, precondition_outputs):
    """The loss lines of diffusers' train_dreambooth_sd3.py (after the transformer call)."""
    from diffusers.training_utils import compute_loss_weighting_for_sd3

    sigmas = t.reshape(-1, 1, 1, 1)
    noisy_model_input = (1.0 - sigmas) * x0 + sigmas * noise
    if precondition_outputs:
        model_pred = model_pred * (-sigmas) + noisy_model_input
    weighting = compute_loss_weighting_for_sd3(weighting_scheme=scheme, sigmas=sigmas)
    target = x0 if precondition_outputs else noise - x0
    return torch.mean((weighting.float() * (model_pred.float() - target.float()) ** 2).reshape(target.shape[0], -1), 1)


@pytest.mark.parametrize("scheme,precondition", [("logit_normal", True), ("sigma_sqrt", True), ("cosmap", False),
                                                 ("none", False)])
def test_sd3_loss_is_the_examples_loss(scheme, precondition):
    from diffusers import FlowMatchEulerDiscreteScheduler

    precond, cond = _sd3_precond(), _cond(4)
    g = torch.Generator().manual_seed(6)
    x0, noise = torch.randn(2, 4, LATENT_CHANNELS, 8, 8, generator=g)
    table = FlowMatchEulerDiscreteScheduler(**SD3_SCHEDULER).sigmas
    t = table[torch.tensor([0, 17, 500, 999])]  # t = 1 (pure noise) and the lowest level included
    objective = FlowMatching(FlowConfig(weighting_scheme=scheme, precondition_outputs=precond and precondition),
                             SD3_SCHEDULER)
    with torch.no_grad():
        ours = objective.loss(precond, x0, full_coordinates(4, 8, 8), edm_sigma(t), noise, cond)
        x_t = (1.0 - t.reshape(-1, 1, 1, 1)) * x0 + t.reshape(-1, 1, 1, 1) * noise
        pred = precond.net.transformer(hidden_states=x_t, timestep=t * 1000, encoder_hidden_states=cond.text_tokens,
                                       pooled_projections=cond.text_pooled, return_dict=False)[0]
        want = _example_loss(pred, x0, noise, t, scheme, precondition)
    torch.testing.assert_close(ours, want, rtol=2e-5, atol=1e-6)


def test_flux_loss_is_the_examples_loss():
    """train_dreambooth_flux.py: packed input, timesteps / 1000, guidance 3.5, unpacked velocity against noise - x0."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    precond = FlowPrecond(FluxNetwork(tiny_flux_transformer())).eval()
    cond = _cond(3, pooled=CLIP_WIDTHS[0])
    g = torch.Generator().manual_seed(8)
    x0, noise = torch.randn(2, 3, LATENT_CHANNELS, 8, 4, generator=g)
    t = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER).sigmas[torch.tensor([3, 250, 990])]
    objective = FlowMatching(FLUX_DEFAULTS, FLUX_SCHEDULER)
    with torch.no_grad():
        ours = objective.loss(precond, x0, full_coordinates(3, 8, 4), edm_sigma(t), noise, cond)
        x_t = (1.0 - t.reshape(-1, 1, 1, 1)) * x0 + t.reshape(-1, 1, 1, 1) * noise
        pred = precond.net.transformer(
            hidden_states=FluxPipeline._pack_latents(x_t, 3, LATENT_CHANNELS, 8, 4), timestep=(t * 1000) / 1000,
            guidance=torch.tensor([3.5]).expand(3), pooled_projections=cond.text_pooled,
            encoder_hidden_states=cond.text_tokens, txt_ids=torch.zeros(5, 3),
            img_ids=FluxPipeline._prepare_latent_image_ids(3, 4, 2, "cpu", torch.float32), return_dict=False)[0]
        pred = FluxPipeline._unpack_latents(pred, height=8 * 8, width=4 * 8, vae_scale_factor=8)
        want = _example_loss(pred, x0, noise, t, "none", False)
    torch.testing.assert_close(ours, want, rtol=2e-5, atol=1e-6)


def test_the_loss_trains_the_network():
    precond, cond = _sd3_precond().train(), _cond(2)
    objective = FlowMatching(FlowConfig(), SD3_SCHEDULER)
    g = torch.Generator().manual_seed(9)
    x0 = torch.randn(2, LATENT_CHANNELS, 8, 8, generator=g)
    sigma = objective.draw_sigmas(2, g, full_shapes=torch.tensor([[8, 8], [8, 8]]))
    loss = objective.loss(precond, x0, full_coordinates(2, 8, 8), sigma, torch.randn(x0.shape, generator=g), cond)
    loss.mean().backward()
    grad = precond.net.transformer.proj_out.weight.grad
    assert loss.shape == (2,) and grad is not None and grad.abs().sum() > 0


@pytest.mark.parametrize("config,scheduler,shape", [(FlowConfig(), SD3_SCHEDULER, None),
                                                    (FlowConfig(weighting_scheme="mode"), SD3_SCHEDULER, None),
                                                    (FLUX_DEFAULTS, FLUX_SCHEDULER, (64, 32))])
def test_heldout_grid_is_the_mid_quantiles_of_the_training_draws(config, scheduler, shape):
    objective = FlowMatching(config, scheduler)
    grid = objective.heldout_sigmas(8, shape)
    assert grid.shape == (8,) and bool((grid[1:] >= grid[:-1]).all())
    n = 100_000
    draws = objective.draw_sigmas(n, torch.Generator().manual_seed(0),
                                  full_shapes=None if shape is None else torch.tensor([shape]).expand(n, 2))
    t_draws = flow_time(draws).sort().values
    quantiles = t_draws[((torch.arange(8) + 0.5) / 8 * n).long()]
    torch.testing.assert_close(flow_time(grid), quantiles, rtol=0, atol=6e-3)


def test_flux_heldout_grid_follows_the_image_size():
    objective = FlowMatching(FLUX_DEFAULTS, FLUX_SCHEDULER)
    assert bool((objective.heldout_sigmas(4, (128, 128)) > objective.heldout_sigmas(4, (32, 32))).all())
