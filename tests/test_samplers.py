"""Samplers against the exact denoiser of a Gaussian, where the probability-flow ODE has a closed-form solution;
classifier-free guidance against its formula."""

import math

import pytest
import torch
from diffusers import EDMDPMSolverMultistepScheduler

from latentpatch.conditioning import Conditioning
from latentpatch.diffusion.edm import EDMPrecond, precond_coefficients
from latentpatch.diffusion.guidance import cat_conditioning, guided, guided_denoiser
from latentpatch.diffusion.samplers import (
    SAMPLERS,
    get_sampler,
    karras_sigmas,
    per_image_noise_fn,
    sample_dpmpp_2m,
    sample_euler,
    sample_heun,
)
from latentpatch.errors import UserError

SHAPE = (4, 2, 2)  # a 16-dimensional "latent"
DIM = 16


class Gaussian:
    """Data N(mu, Sigma) with a non-diagonal Sigma (eigenvalues ~0.02..0.76, like normalised latents).

    D*(x; sigma) = mu + Sigma (Sigma + sigma^2 I)^-1 (x - mu), and the probability-flow ODE from sigma_max
    to 0 is the linear map x0 = mu + Sigma^1/2 (Sigma + sigma_max^2 I)^-1/2 (x - mu): in Sigma's eigenbasis
    each coordinate scales as sqrt(lambda + sigma^2).
    """

    def __init__(self, seed=0):
        g = torch.Generator().manual_seed(seed)
        a = torch.randn(DIM, DIM, generator=g, dtype=torch.float64)
        self.cov = 0.25 * a @ a.T / DIM + 0.02 * torch.eye(DIM, dtype=torch.float64)
        self.mu = 0.5 * torch.randn(DIM, generator=g, dtype=torch.float64)
        self.lam, self.U = torch.linalg.eigh(self.cov)

    def _apply(self, x, coef):
        flat = x.reshape(x.shape[0], -1).to(torch.float64) - self.mu
        return (self.mu + ((flat @ self.U) * coef) @ self.U.T).reshape(x.shape).to(x.dtype)

    def denoise(self, x, sigma):
        return self._apply(x, self.lam / (self.lam + sigma.to(torch.float64).reshape(-1, 1) ** 2))

    def ode_solution(self, x_start, sigma_max):
        return self._apply(x_start, (self.lam / (self.lam + sigma_max**2)).sqrt())

    def eigen_relative_error(self, out, ref):
        """Largest error std along an eigen-direction, relative to the data's std there."""
        err = (out - ref).reshape(len(out), -1).to(torch.float64) @ self.U
        return (err.std(0) / self.lam.sqrt()).max().item()

    def moment_errors(self, samples):
        flat = samples.reshape(len(samples), -1).to(torch.float64)
        mean_err = (flat.mean(0) - self.mu).abs().max().item()
        cov_err = ((torch.cov(flat.T) - self.cov).norm() / self.cov.norm()).item()
        return mean_err, cov_err


@pytest.fixture(scope="module")
def gauss():
    return Gaussian()


def start_noise(n, seed=1, dtype=torch.float64):
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def seeded_noise_fn(seed):
    gen = torch.Generator().manual_seed(seed)
    return lambda like: torch.randn(like.shape, generator=gen, dtype=like.dtype)


# --- noise levels -------------------------------------------------------------------------------


def test_karras_sigmas_run_from_sigma_max_to_sigma_min_then_zero():
    s = karras_sigmas(18, sigma_min=0.002, sigma_max=80.0, rho=7.0)
    assert s.shape == (19,) and s.dtype == torch.float64
    assert s[0].item() == pytest.approx(80.0, rel=1e-12)
    assert s[-2].item() == pytest.approx(0.002, rel=1e-12)
    assert s[-1].item() == 0.0
    assert bool((s[1:] < s[:-1]).all())
    i = 5  # eq. 5 at one interior step
    assert s[i].item() == pytest.approx((80 ** (1 / 7) + i / 17 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7, rel=1e-12)


def test_karras_sigmas_single_step_and_bad_arguments():
    assert karras_sigmas(1).tolist() == pytest.approx([80.0, 0.0])
    with pytest.raises(UserError, match="at least 1"):
        karras_sigmas(0)
    with pytest.raises(UserError, match="sigma_min < sigma_max"):
        karras_sigmas(10, sigma_min=1.0, sigma_max=0.5)


# --- accuracy on a Gaussian ---------------------------------------------------------------------


def test_heun_is_edm_algorithm_2_as_in_nvlabs_edm_sampler(gauss):
    """Line by line NVlabs/edm generate.py `edm_sampler`, churn included, with the same noise stream."""

    def edm_sampler(net, latents, randn_like, num_steps, S_churn, S_min, S_max, S_noise=1.0):
        t_steps = karras_sigmas(num_steps)
        x_next = latents * t_steps[0]
        for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
            x_cur = x_next
            gamma = min(S_churn / num_steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0
            t_hat = t_cur + gamma * t_cur
            x_hat = x_cur + (t_hat**2 - t_cur**2).sqrt() * S_noise * randn_like(x_cur) if gamma > 0 else x_cur
            d_cur = (x_hat - net(x_hat, t_hat.expand(len(x_hat)))) / t_hat
            x_next = x_hat + (t_next - t_hat) * d_cur
            if i < num_steps - 1:
                d_prime = (x_next - net(x_next, t_next.expand(len(x_hat)))) / t_next
                x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
        return x_next

    z = start_noise(64)
    for churn in (0.0, 10.0):
        ref = edm_sampler(gauss.denoise, z, seeded_noise_fn(3), 12, churn, 0.05, 10.0)
        out = sample_heun(gauss.denoise, z * 80.0, karras_sigmas(12), noise_fn=seeded_noise_fn(3),
                          churn=churn, s_tmin=0.05, s_tmax=10.0)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,steps,tol", [("heun", 32, 0.03), ("dpmpp_2m", 32, 0.03), ("euler", 256, 0.02)])
def test_deterministic_samplers_follow_the_exact_probability_flow(gauss, name, steps, tol):
    x = start_noise(256) * 80.0
    out = get_sampler(name)(gauss.denoise, x, karras_sigmas(steps))
    assert gauss.eigen_relative_error(out, gauss.ode_solution(x, 80.0)) < tol


@pytest.mark.parametrize("name,lo,hi", [("heun", 3.5, 5.5), ("dpmpp_2m", 3.5, 5.5), ("euler", 1.8, 2.2)])
def test_error_falls_at_the_samplers_order_when_steps_double(gauss, name, lo, hi):
    x = start_noise(256) * 80.0
    ref = gauss.ode_solution(x, 80.0)
    sampler = get_sampler(name)
    e32, e64 = (gauss.eigen_relative_error(sampler(gauss.denoise, x, karras_sigmas(n)), ref) for n in (32, 64))
    assert lo < e32 / e64 < hi  # 2nd order: x4, 1st order: x2


@pytest.mark.parametrize("name,steps", [("heun", 32), ("dpmpp_2m", 32), ("euler", 256)])
def test_samplers_reproduce_gaussian_mean_and_covariance(gauss, name, steps):
    samples = get_sampler(name)(gauss.denoise, start_noise(4000) * 80.0, karras_sigmas(steps))
    mean_err, cov_err = gauss.moment_errors(samples)
    assert mean_err < 0.05 and cov_err < 0.1  # 4000 exact samples: ~0.016 and ~0.056


@pytest.mark.parametrize("sampler", [sample_heun, sample_euler])
def test_churn_still_converges_to_the_data_distribution(gauss, sampler):
    steps = 64 if sampler is sample_heun else 256
    samples = sampler(gauss.denoise, start_noise(4000) * 80.0, karras_sigmas(steps), noise_fn=seeded_noise_fn(2),
                      churn=30.0, s_tmin=0.05, s_tmax=50.0)
    mean_err, cov_err = gauss.moment_errors(samples)
    assert mean_err < 0.05 and cov_err < 0.12


def test_dpmpp_2m_matches_diffusers_edm_dpmsolver_scheduler(gauss):
    """Our EDMPrecond + sample_dpmpp_2m against diffusers' own EDM preconditioning + DPM-Solver++(2M) steps."""

    def raw_net(x_in, c_noise):  # the exact F* from c_in * x and c_noise
        sigma = (4 * c_noise.to(torch.float64)).exp().reshape(-1, 1, 1, 1)
        c_skip, c_out, c_in, _ = precond_coefficients(sigma, 0.5)
        x = x_in.to(torch.float64) / c_in
        return ((gauss.denoise(x, sigma.flatten()) - c_skip * x) / c_out).float()

    precond = EDMPrecond(lambda net_in, c_noise, cond: raw_net(net_in[:, :4], c_noise), sigma_data=0.5)
    z, coords = start_noise(64, dtype=torch.float32), torch.zeros(64, 2, 2, 2)
    for steps in (10, 25):
        sched = EDMDPMSolverMultistepScheduler(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, solver_order=2,
                                               prediction_type="epsilon", final_sigmas_type="zero")
        sched.set_timesteps(steps)
        x = z * sched.sigmas[0]
        for t in sched.timesteps:
            x = sched.step(raw_net(sched.scale_model_input(x, t), t.expand(64)), t, x).prev_sample
        ours = sample_dpmpp_2m(lambda x, s: precond(x, s, coords), z * 80.0, karras_sigmas(steps).float())
        torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


# --- seeds, callbacks, registry -----------------------------------------------------------------


@pytest.mark.parametrize("name", ["heun", "euler"])
def test_per_image_seeds_give_the_same_images_in_any_batch_split(gauss, name):
    seeds = list(range(100, 108))
    sigmas = karras_sigmas(8)
    lam, mu = gauss.lam.reshape(SHAPE), gauss.mu.reshape(SHAPE)

    def elementwise_denoise(x, sigma):  # Sigma's eigenvalues on the diagonal: no matmul, whose rounding
        sigma = sigma.reshape(-1, 1, 1, 1)  # may depend on the batch size
        return mu + lam / (lam + sigma**2) * (x - mu)

    def run(batch_seeds):
        noise_fn = per_image_noise_fn(batch_seeds)
        x = noise_fn(torch.empty(len(batch_seeds), *SHAPE, dtype=torch.float64)) * sigmas[0]
        return get_sampler(name)(elementwise_denoise, x, sigmas, noise_fn=noise_fn, churn=20.0)

    whole = run(seeds)
    split = torch.cat([run(seeds[:3]), run(seeds[3:])])
    assert torch.equal(whole, split)
    assert not torch.equal(whole[0], whole[1])


def test_heun_uses_two_evaluations_per_step_except_the_last_and_reports_each_step(gauss):
    calls, seen = [], []

    def counting(x, sigma):
        calls.append(sigma[0].item())
        return gauss.denoise(x, sigma)

    sample_heun(counting, start_noise(2) * 80.0, karras_sigmas(6), callback=seen.append, progress=True)
    assert len(calls) == 2 * 6 - 1
    assert [info["i"] for info in seen] == list(range(6))
    assert set(seen[0]) == {"x", "i", "sigma", "sigma_hat", "denoised"}


def test_dpmpp_2m_evaluates_once_per_step_and_lands_on_the_last_denoised(gauss):
    seen = []
    out = sample_dpmpp_2m(gauss.denoise, start_noise(2) * 80.0, karras_sigmas(5), callback=seen.append)
    assert len(seen) == 5 and torch.equal(out, seen[-1]["denoised"])


def test_dpmpp_2m_refuses_churn(gauss):
    with pytest.raises(UserError, match="deterministic"):
        sample_dpmpp_2m(gauss.denoise, start_noise(2) * 80.0, karras_sigmas(4), churn=1.0)


def test_get_sampler_names_valid_samplers_on_error():
    assert get_sampler("heun") is sample_heun and set(SAMPLERS) == {"heun", "euler", "dpmpp_2m"}
    with pytest.raises(UserError, match="unknown sampler 'ddim'; valid samplers: dpmpp_2m, euler, heun"):
        get_sampler("ddim")


# --- classifier-free guidance -------------------------------------------------------------------


class LabelPrecond:
    """D = x * (1 + label) + sigma: distinct outputs per label; records the batch size of each call."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, sigma, coords, cond):
        self.batches.append(len(x))
        assert len(coords) == len(x) == len(cond.class_labels)
        return x * (1 + cond.class_labels.reshape(-1, 1, 1, 1)) + sigma.reshape(-1, 1, 1, 1) + coords[:, :1]


def guidance_inputs():
    x = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    coords = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(1))
    cond = Conditioning(class_labels=torch.tensor([0, 1, 2]))
    uncond = Conditioning(class_labels=torch.tensor([10, 10, 10]))
    return x, torch.tensor([0.5, 1.0, 2.0]), coords, cond, uncond


def test_guidance_scale_one_is_the_conditional_model_in_one_call():
    x, sigma, coords, cond, uncond = guidance_inputs()
    precond = LabelPrecond()
    out = guided(precond, x, sigma, coords, cond, uncond, 1.0)
    assert torch.equal(out, LabelPrecond()(x, sigma, coords, cond)) and precond.batches == [3]


def test_guidance_scale_zero_is_the_unconditional_model():
    x, sigma, coords, cond, uncond = guidance_inputs()
    out = guided(LabelPrecond(), x, sigma, coords, cond, uncond, 0.0)
    assert torch.equal(out, LabelPrecond()(x, sigma, coords, uncond))


def test_guidance_combines_d_u_plus_scale_times_difference_in_one_batched_call():
    x, sigma, coords, cond, uncond = guidance_inputs()
    precond = LabelPrecond()
    out = guided(precond, x, sigma, coords, cond, uncond, 3.5)
    d_c, d_u = LabelPrecond()(x, sigma, coords, cond), LabelPrecond()(x, sigma, coords, uncond)
    torch.testing.assert_close(out, d_u + 3.5 * (d_c - d_u))
    assert precond.batches == [6]


def test_guided_denoiser_plugs_into_a_sampler():
    x, _, coords, cond, uncond = guidance_inputs()
    denoise = guided_denoiser(LabelPrecond(), coords, cond, uncond, 2.0)
    assert sample_euler(denoise, x, karras_sigmas(3, sigma_max=1.0)).shape == x.shape


def test_guidance_without_an_unconditional_input_is_refused_unless_scale_is_one():
    x, sigma, coords, cond, _ = guidance_inputs()
    with pytest.raises(UserError, match="scale 1"):
        guided(LabelPrecond(), x, sigma, coords, cond, None, 2.0)


def test_cat_conditioning_concatenates_set_fields_and_keeps_none():
    mask = torch.ones(1, 3, dtype=torch.bool)
    a = Conditioning(class_labels=torch.tensor([1]), text_tokens=torch.zeros(1, 3, 4), text_mask=mask)
    b = Conditioning(class_labels=torch.tensor([2]), text_tokens=torch.ones(1, 3, 4), text_mask=~mask)
    ab = cat_conditioning(a, b)
    assert ab.class_labels.tolist() == [1, 2] and ab.text_tokens.shape == (2, 3, 4) and ab.text_pooled is None
    assert ab.text_mask.tolist() == [[True] * 3, [False] * 3]
    with pytest.raises(ValueError, match="text_pooled"):
        cat_conditioning(Conditioning(text_pooled=torch.zeros(1, 2)), Conditioning())
