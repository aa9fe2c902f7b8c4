"""EDM preconditioning and loss checked against closed forms for Gaussian data (Karras et al. 2022, Table 1)."""

import math

import pytest
import torch
from torch import nn

from latentpatch.diffusion.edm import (
    EDMConfig,
    EDMPrecond,
    denoising_loss_at,
    fixed_noise,
    heldout_sigma_grid,
    loss_weight,
    precond_coefficients,
    training_sigmas,
)

SD = 0.5


def training_loss(precond, x0, coords, cfg=None, generator=None):
    """The loss of a training step as the trainer draws it: sigma ~ training_sigmas, n ~ N(0, I)."""
    cfg = cfg or EDMConfig()
    sigma = training_sigmas(x0.shape[0], cfg, generator)
    noise = torch.randn(x0.shape, generator=generator)
    return denoising_loss_at(precond, x0, coords, sigma, noise, sigma_data=SD)


class GaussianOracle(nn.Module):
    """The exact F* for data N(mu, s^2 I): D*(x) = (s^2 x + sigma^2 mu) / (s^2 + sigma^2), F* = (D* - c_skip x) / c_out.

    It reads sigma back from c_noise and x from the c_in-scaled input, so it only works if EDMPrecond
    feeds the network exactly what Table 1 says. It records the sigmas it saw.
    """

    def __init__(self, mu: float, s: float, channels: int, sigma_data: float = SD):
        super().__init__()
        self.mu, self.s, self.channels, self.sigma_data = mu, s, channels, sigma_data
        self.seen_sigma = None

    def forward(self, net_in, c_noise, cond=None):
        net_in, c_noise = net_in.double(), c_noise.double()
        sigma = (4 * c_noise).exp().reshape(-1, 1, 1, 1)
        self.seen_sigma = sigma.flatten()
        c_skip, c_out, c_in, _ = precond_coefficients(sigma, self.sigma_data)
        x = net_in[:, : self.channels] / c_in
        d_star = (self.s**2 * x + sigma**2 * self.mu) / (self.s**2 + sigma**2)
        return ((d_star - c_skip * x) / c_out).float()


def closed_form_D(x, sigma, mu, s):
    sigma = sigma.reshape(-1, 1, 1, 1)
    return (s**2 * x + sigma**2 * mu) / (s**2 + sigma**2)


def coords_for(batch, h, w):
    return torch.rand(batch, 2, h, w, generator=torch.Generator().manual_seed(7)) * 2 - 1


def test_edm_config_defaults_are_the_papers():
    cfg = EDMConfig()
    assert (cfg.P_mean, cfg.P_std, cfg.sigma_min, cfg.sigma_max) == (-1.2, 1.2, 0.002, 80.0)
    assert cfg.sigma_data is None  # unset: training takes the latent store's measured std


def test_coefficients_obey_table_1_identities():
    sigma = torch.logspace(-3, 2, 50, dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = precond_coefficients(sigma, SD)
    torch.testing.assert_close(c_in**2 * (sigma**2 + SD**2), torch.ones_like(sigma))  # unit-variance input
    torch.testing.assert_close(c_skip + c_out**2 / SD**2, torch.ones_like(sigma))
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    torch.testing.assert_close(loss_weight(sigma, SD), 1 / c_out**2)  # lambda = 1 / c_out^2: unit effective weight


def test_coefficients_limits_skip_at_low_noise_and_predict_at_high_noise():
    c_skip, c_out, _, _ = precond_coefficients(torch.tensor([1e-8, 1e8], dtype=torch.float64), SD)
    assert c_skip[0] == pytest.approx(1.0) and c_out[0] == pytest.approx(0.0, abs=1e-7)
    assert c_skip[1] == pytest.approx(0.0, abs=1e-15) and c_out[1] == pytest.approx(SD)


def test_zero_network_is_ideal_for_data_at_sigma_data():
    """For data N(0, sd^2), D* = sd^2/(sigma^2+sd^2) x = c_skip x, so F* = 0 exactly."""
    precond = EDMPrecond(lambda net_in, c_noise, cond: torch.zeros_like(net_in[:, :3]), sigma_data=SD)
    x = torch.randn(5, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([0.01, 0.1, 0.5, 3.0, 60.0])
    expected = closed_form_D(x, sigma, 0.0, SD)
    torch.testing.assert_close(precond(x, sigma, coords_for(5, 4, 4)), expected, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mu,s", [(0.3, 0.8), (-1.0, 0.2)])
def test_precond_recovers_closed_form_denoiser_of_gaussian_data(mu, s):
    precond = EDMPrecond(GaussianOracle(mu, s, channels=3), sigma_data=SD)
    x = torch.randn(6, 3, 4, 4, generator=torch.Generator().manual_seed(1)) * 2
    sigma = torch.tensor([0.02, 0.1, 0.5, 1.0, 5.0, 20.0])
    D = precond(x, sigma, coords_for(6, 4, 4))
    torch.testing.assert_close(D, closed_form_D(x, sigma, mu, s).float(), rtol=1e-6, atol=1e-6)


def test_coordinates_are_concatenated_unscaled():
    seen = {}

    def coord_sum_net(net_in, c_noise, cond=None):
        seen["net_in"] = net_in
        return (net_in[:, -2:].sum(1, keepdim=True)).expand(-1, 4, -1, -1)

    precond = EDMPrecond(coord_sum_net, sigma_data=SD)
    coords = coords_for(3, 5, 6)
    x = torch.randn(3, 4, 5, 6)
    sigma = torch.tensor([0.1, 1.0, 10.0])
    D = precond(x, sigma, coords)
    c_skip, c_out, c_in, _ = precond_coefficients(sigma.reshape(-1, 1, 1, 1), SD)
    assert torch.equal(seen["net_in"][:, 4:], coords)
    torch.testing.assert_close(seen["net_in"][:, :4], c_in * x)
    torch.testing.assert_close(D, c_skip * x + c_out * coords.sum(1, keepdim=True))


def test_scalar_sigma_broadcasts_and_c_noise_is_flat():
    seen = {}

    def net(net_in, c_noise, cond=None):
        seen["c_noise"], seen["cond"] = c_noise, cond
        return torch.zeros_like(net_in[:, :2])

    cond = object()
    EDMPrecond(net)(torch.randn(4, 2, 3, 3), torch.tensor(2.0), coords_for(4, 3, 3), cond)
    assert seen["c_noise"].shape == (4,) and seen["cond"] is cond
    torch.testing.assert_close(seen["c_noise"], torch.full((4,), math.log(2.0) / 4))


def test_output_is_float32_when_network_runs_in_bfloat16():
    precond = EDMPrecond(lambda net_in, c_noise, cond: net_in[:, :2].to(torch.bfloat16), sigma_data=SD)
    D = precond(torch.randn(2, 2, 3, 3, dtype=torch.float64), torch.tensor([0.5, 2.0]), coords_for(2, 3, 3))
    assert D.dtype == torch.float32


def test_loss_with_ideal_network_is_one_on_average_when_data_std_is_sigma_data():
    """lambda = (sigma^2+sd^2)/(sigma sd)^2 and the exact denoiser: E[loss] = lambda sigma^2 sd^2/(sigma^2+sd^2) = 1."""
    precond = EDMPrecond(GaussianOracle(0.0, SD, channels=4), sigma_data=SD)
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(256, 4, 8, 8, generator=gen) * SD
    loss = training_loss(precond, x0, coords_for(256, 8, 8), EDMConfig(), gen)
    assert loss.shape == (256,)
    assert loss.mean().item() == pytest.approx(1.0, abs=0.03)


def test_loss_matches_posterior_variance_at_each_sigma():
    """E[(D*(x0 + sigma n) - x0)^2] = sigma^2 s^2 / (sigma^2 + s^2), the posterior variance per dimension."""
    mu, s = 0.4, 0.9
    precond = EDMPrecond(GaussianOracle(mu, s, channels=4), sigma_data=SD)
    gen = torch.Generator().manual_seed(4)
    sigmas = heldout_sigma_grid(8).repeat_interleave(16)
    x0 = mu + s * torch.randn(len(sigmas), 4, 16, 16, generator=gen)
    noise = torch.randn(x0.shape, generator=gen)
    loss = denoising_loss_at(precond, x0, coords_for(len(sigmas), 16, 16), sigmas, noise, sigma_data=SD)
    expected = loss_weight(sigmas, SD) * sigmas**2 * s**2 / (sigmas**2 + s**2)
    ratio = (loss / expected).reshape(8, 16).mean(1)
    torch.testing.assert_close(ratio, torch.ones(8), atol=0.05, rtol=0)


def test_training_loss_uses_sigmas_it_drew_and_matches_closed_form():
    mu, s = -0.2, 0.3
    oracle = GaussianOracle(mu, s, channels=2)
    gen = torch.Generator().manual_seed(5)
    x0 = mu + s * torch.randn(512, 2, 16, 16, generator=gen)
    loss = training_loss(EDMPrecond(oracle, SD), x0, coords_for(512, 16, 16), generator=gen)
    sigma = oracle.seen_sigma.float()
    expected = loss_weight(sigma, SD) * sigma**2 * s**2 / (sigma**2 + s**2)
    assert (loss / expected).mean().item() == pytest.approx(1.0, abs=0.02)


def test_training_sigmas_are_log_normal_with_p_mean_and_p_std():
    oracle = GaussianOracle(0.0, SD, channels=1)
    x0 = torch.zeros(8192, 1, 1, 1)
    training_loss(EDMPrecond(oracle), x0, torch.zeros(8192, 2, 1, 1), EDMConfig(P_mean=-0.4, P_std=0.7),
                  torch.Generator().manual_seed(6))
    log_sigma = oracle.seen_sigma.log()
    assert log_sigma.mean().item() == pytest.approx(-0.4, abs=0.03)
    assert log_sigma.std().item() == pytest.approx(0.7, abs=0.03)


def test_heldout_sigma_grid_sits_at_mid_quantiles_of_training_distribution():
    grid = heldout_sigma_grid(8, P_mean=-1.2, P_std=1.2)
    assert grid.shape == (8,) and bool((grid[1:] > grid[:-1]).all())
    z = (grid.double().log() + 1.2) / 1.2
    quantiles = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    torch.testing.assert_close(quantiles, (torch.arange(8, dtype=torch.float64) + 0.5) / 8, atol=1e-6, rtol=0)
    assert heldout_sigma_grid(1).item() == pytest.approx(math.exp(-1.2))


def test_fixed_noise_depends_only_on_seed():
    a, b = fixed_noise((3, 4, 5), 11), fixed_noise((3, 4, 5), 11, dtype=torch.float64)
    assert torch.equal(a, b.float()) and b.dtype == torch.float64
    assert not torch.equal(a, fixed_noise((3, 4, 5), 12))
    assert a.std().item() == pytest.approx(1.0, abs=0.25)
