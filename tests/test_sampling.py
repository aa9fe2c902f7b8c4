"""generate_latents: the full coordinate grid, per-image seeds, guidance, and the Gaussian the sampler must hit."""

from __future__ import annotations

import math

import pytest
import torch

from latentpatch.conditioning import Conditioning
from latentpatch.errors import UserError
from latentpatch.patches import full_coordinates, random_crops
from latentpatch.sampling.latents import generate_latents
from latentpatch.sampling.options import SampleOptions
from latentpatch.seeding import image_seed

SHAPE = (2, 2, 3)  # C, h, w: 12 dimensions


class GaussianPrecond:
    """The exact denoiser of x0 ~ N(mu, S): D(x; sigma) = mu + S (S + sigma^2 I)^-1 (x - mu).

    Records the coordinates it is called with, which must be the full grid.
    """

    def __init__(self, mu: torch.Tensor, cov: torch.Tensor) -> None:
        self.mu, self.cov = mu.double(), cov.double()
        self.evals, self.evecs = torch.linalg.eigh(self.cov)
        self.coords: list[torch.Tensor] = []

    def __call__(self, x, sigma, coords, cond=None):
        self.coords.append(coords)
        b = x.shape[0]
        flat = x.reshape(b, -1).double() - self.mu
        s2 = sigma.double().reshape(b, 1) ** 2
        shrink = self.evals / (self.evals + s2)  # [B, d]
        out = self.mu + ((flat @ self.evecs) * shrink) @ self.evecs.T
        return out.reshape(x.shape).float()


def _gaussian(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    d = math.prod(SHAPE)
    a = torch.randn(d, d, generator=g, dtype=torch.float64) * 0.15
    cov = a @ a.T + 0.02 * torch.eye(d, dtype=torch.float64)
    return torch.randn(d, generator=g, dtype=torch.float64) * 0.5, cov


def _z_scores(x: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Errors of the sample mean and covariance in standard errors (Var cov_ij = (S_ii S_jj + S_ij^2) / n)."""
    n, var = x.shape[0], cov.diag()
    z_mean = (x.mean(0) - mu) / (var / n).sqrt()
    z_cov = (torch.cov(x.T) - cov) / ((var[:, None] * var[None, :] + cov**2) / n).sqrt()
    return z_mean, z_cov


@pytest.mark.parametrize(
    "sampler,steps,churn,n",
    [("heun", 80, 0.0, 4000), ("heun", 40, 10.0, 1500), ("euler", 400, 0.0, 4000), ("dpmpp_2m", 80, 0.0, 4000)],
)
def test_exact_gaussian_denoiser_gives_that_gaussian(sampler, steps, churn, n):
    mu, cov = _gaussian()
    x = generate_latents(GaussianPrecond(mu, cov), [image_seed(7, i) for i in range(n)], SHAPE, sampler=sampler,
                         steps=steps, churn=churn).reshape(n, -1).double()
    z_mean, z_cov = _z_scores(x, mu, cov)
    # The seeds are fixed, so this is deterministic; 5 standard errors leaves room for 90 statistics.
    assert z_mean.abs().max() < 5
    assert z_cov.abs().max() < 5


@pytest.mark.parametrize("sampler,steps,tol", [("heun", 80, 0.005), ("dpmpp_2m", 80, 0.005), ("euler", 400, 0.03)])
def test_deterministic_samplers_follow_the_exact_probability_flow(sampler, steps, tol):
    # For Gaussian data the probability-flow ODE (Karras et al. 2022, eq. 1) is solved in closed form
    # along each eigenvector: x(sigma) - mu scales with sqrt(lambda + sigma^2).
    mu, cov = _gaussian()
    lam, u = torch.linalg.eigh(cov)
    seeds = [image_seed(1, i) for i in range(200)]
    x = generate_latents(GaussianPrecond(mu, cov), seeds, SHAPE, sampler=sampler, steps=steps).reshape(200, -1)
    start = torch.stack([torch.randn(SHAPE, generator=torch.Generator().manual_seed(s)) for s in seeds]) * 80.0
    exact = mu + ((start.reshape(200, -1).double() - mu) @ u * (lam / (lam + 80.0**2)).sqrt()) @ u.T
    rel = (x.double() - exact).norm(dim=1) / (exact - mu).norm(dim=1)
    assert rel.max() < tol


def test_network_sees_the_full_coordinate_grid_like_a_full_size_training_crop():
    mu, cov = _gaussian()
    precond = GaussianPrecond(mu, cov)
    generate_latents(precond, [1, 2, 3], SHAPE, steps=3)
    c, h, w = SHAPE
    expected = full_coordinates(3, h, w, device="cpu", dtype=torch.float32)
    _, crop_coords = random_crops(torch.zeros(3, c, h, w), h, w, torch.Generator().manual_seed(0))
    assert torch.equal(expected, crop_coords)
    assert len(precond.coords) == 2 * 3 - 1  # Heun: 2 calls per step, 1 into sigma = 0
    for coords in precond.coords:
        assert torch.equal(coords, expected)
    assert coords[0, 0, 0, 0] == -1 and coords[0, 0, 0, -1] == 1 and coords[0, 1, -1, 0] == 1


@pytest.mark.parametrize("churn", [0.0, 5.0])
def test_image_depends_on_its_seed_not_on_its_batch(churn):
    # Starting noise and churn noise of image b come from its own generator: exact on CPU float32.
    precond = GaussianPrecond(*_gaussian())
    seeds = [image_seed(3, i) for i in range(6)]
    kw = dict(steps=6, churn=churn, dtype=torch.float32)
    whole = generate_latents(precond, seeds, SHAPE, **kw)
    for size in (1, 2, 4):
        parts = torch.cat([generate_latents(precond, seeds[k : k + size], SHAPE, **kw) for k in range(0, 6, size)])
        assert torch.equal(parts, whole)
    assert torch.equal(generate_latents(precond, seeds[::-1], SHAPE, **kw).flip(0), whole)
    assert not torch.allclose(whole[0], whole[1])


def test_churn_changes_the_sample_and_zero_churn_is_deterministic():
    precond = GaussianPrecond(*_gaussian())
    a = generate_latents(precond, [5], SHAPE, steps=6)
    b = generate_latents(precond, [5], SHAPE, steps=6)
    c = generate_latents(precond, [5], SHAPE, steps=6, churn=20.0)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, atol=1e-3)


class LabelPrecond:
    """D(x) = 0.5 x + offset[label]; the null label (3) has offset 0, so guidance is checkable exactly."""

    offsets = torch.tensor([1.0, -2.0, 3.0, 0.0])

    def __call__(self, x, sigma, coords, cond=None):
        off = self.offsets[cond.class_labels].reshape(-1, 1, 1, 1)
        return 0.5 * x + off


@pytest.mark.parametrize("scale", [0.0, 1.0, 2.5])
def test_classifier_free_guidance_mixes_conditional_and_null_label(scale):
    # One Euler step into sigma = 0 returns D(x0) itself: x1 = x0 + (0 - s0) (x0 - D) / s0 = D.
    labels = torch.tensor([0, 1, 2])
    cond, uncond = Conditioning(class_labels=labels), Conditioning(class_labels=torch.full_like(labels, 3))
    seeds = [11, 12, 13]
    out = generate_latents(LabelPrecond(), seeds, SHAPE, cond, uncond, sampler="euler", steps=1, guidance=scale)
    # The starting noise of image b: its own generator's first draw, times sigma_max.
    noise = torch.stack([torch.randn(SHAPE, generator=torch.Generator().manual_seed(s)) for s in seeds]) * 80.0
    expected = 0.5 * noise + scale * LabelPrecond.offsets[labels].reshape(-1, 1, 1, 1)
    assert torch.allclose(out, expected, atol=1e-4)


@pytest.mark.parametrize(
    "kw,message",
    [
        (dict(steps=0), "--steps must be a whole number >= 1"),
        (dict(guidance=-0.5), "--guidance must be >= 0"),
        (dict(sampler="ddim"), "unknown sampler 'ddim'"),
        (dict(churn=-1.0), "--churn must be >= 0"),
        (dict(sampler="dpmpp_2m", churn=1.0), "dpmpp_2m sampler is deterministic"),
        (dict(batch_size=0), "--batch-size must be a whole number >= 1"),
        (dict(seed=1.5), "--seed must be a whole number"),
    ],
)
def test_bad_settings_are_user_errors(kw, message):
    with pytest.raises(UserError, match=message):
        SampleOptions(**(dict(steps=4) | kw)).check()


def test_guidance_on_an_unconditional_model_is_refused():
    with pytest.raises(UserError, match="guidance"):
        generate_latents(GaussianPrecond(*_gaussian()), [1], SHAPE, steps=2, guidance=2.0)


def test_image_seeds_are_stable_and_distinct():
    # A recorded (seed, index) must make the same image in every later version: pin the derivation.
    assert image_seed(0, 0) == 6113538345208582997
    assert image_seed(0, 1) != image_seed(1, 0)
    assert len({image_seed(s, i) for s in range(20) for i in range(500)}) == 10_000
    assert all(0 <= image_seed(2**40, i) < 2**63 for i in range(10))


def test_autocast_runs_the_network_in_bf16_and_integrates_in_float32_or_more():
    seen = []

    def precond(x, sigma, coords, cond=None):
        seen.append((torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"), x.dtype))
        return 0.1 * x.float()

    out = generate_latents(precond, [0, 1], SHAPE, steps=3, autocast=True)
    assert out.dtype == torch.float32
    assert seen and all(s == (True, torch.bfloat16, torch.float64) for s in seen)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_sampling_runs_the_network_under_bf16_autocast():
    seen = []

    def precond(x, sigma, coords, cond=None):
        seen.append(torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else None)
        return 0.1 * x.float()

    out = generate_latents(precond, [0, 1], SHAPE, steps=3, device="cuda")
    assert out.device.type == "cuda" and out.dtype == torch.float32
    assert seen and all(s == torch.bfloat16 for s in seen)
