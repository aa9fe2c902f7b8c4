"""Noise-level levers of the patch schedule: coupling a stage to a slice of the log-normal, and a min-SNR cap."""

import math

import pytest
import scipy.stats
import torch

from latentpatch.diffusion.edm import EDMConfig, loss_weight, training_sigmas
from latentpatch.errors import UserError
from latentpatch.patches import PatchConfig, PatchSchedule

EDM = EDMConfig(sigma_data=0.5)


def _g(seed=0):
    return torch.Generator().manual_seed(seed)


def test_uncoupled_draw_is_todays_log_normal_bit_for_bit():
    expected = (torch.randn(1000, generator=_g()) * EDM.P_std + EDM.P_mean).exp()
    assert torch.equal(training_sigmas(1000, EDM, _g()), expected)
    assert torch.equal(training_sigmas(1000, EDM, _g(), quantiles=(0.0, 0.5), overlap=1.0), expected)


def test_schedule_gives_each_stage_a_slice_as_wide_as_its_probability():
    low = PatchSchedule(PatchConfig(sigma_overlap=0.25), 16, 16, 8)
    assert [(s.height, s.sigma_slice, s.sigma_overlap) for s in low.stages] == [(8, (0.0, 0.5), 0.25),
                                                                               (16, (0.5, 1.0), 0.25)]
    high = PatchSchedule(PatchConfig(sigma_overlap=0.25, sigma_order="crops-high", real_p=0.2), 16, 16, 8)
    assert [(s.height, s.sigma_slice) for s in high.stages] == [(8, (pytest.approx(0.2), 1.0)),
                                                                 (16, (0.0, pytest.approx(0.2)))]
    plain = PatchSchedule(PatchConfig(), 16, 16, 8)
    assert all(s.sigma_slice == (0.0, 1.0) and s.sigma_overlap == 1.0 for s in plain.stages)


def test_a_fully_coupled_draw_lies_in_its_stages_interval():
    q0, q1 = 0.5, 0.8
    sigmas = training_sigmas(2000, EDM, _g(), quantiles=(q0, q1), overlap=0.0)
    lo, hi = (math.exp(EDM.P_mean + EDM.P_std * scipy.stats.norm.ppf(q)) for q in (q0, q1))
    assert sigmas.min() >= lo * (1 - 1e-6) and sigmas.max() <= hi * (1 + 1e-6)
    # and fills it: its quantiles are uniform over the slice
    u = scipy.stats.norm.cdf((sigmas.double().log().numpy() - EDM.P_mean) / EDM.P_std)
    assert scipy.stats.kstest((u - q0) / (q1 - q0), "uniform").pvalue > 0.01


def test_the_marginal_over_stages_is_still_the_log_normal():
    schedule = PatchSchedule(PatchConfig(sigma_overlap=0.3, real_p=0.4), 16, 16, 8)
    n = 20_000
    draws = [training_sigmas(round(n * s.prob), EDM, _g(k), quantiles=s.sigma_slice, overlap=s.sigma_overlap)
             for k, s in enumerate(schedule.stages)]
    z = (torch.cat(draws).double().log() - EDM.P_mean) / EDM.P_std
    assert scipy.stats.kstest(z.numpy(), "norm").pvalue > 0.01
    # while each stage's own draws are not: the crops' are shifted to the low noise levels
    crops = (draws[0].double().log() - EDM.P_mean) / EDM.P_std
    assert crops.mean() < -0.3 and scipy.stats.kstest(crops.numpy(), "norm").pvalue < 1e-6


def test_snr_cap_caps_lambda_at_one_plus_gamma_over_sigma_data_squared():
    sd = 0.5
    sigma = torch.tensor([0.05, sd / math.sqrt(5.0), 0.5, 4.0])  # SNR 100, 5, 1, 1/64
    edm = loss_weight(sigma, sd)
    torch.testing.assert_close(edm, (1 + sd**2 / sigma**2) / sd**2)
    capped = loss_weight(sigma, sd, snr_cap=5.0)
    torch.testing.assert_close(capped, torch.stack([torch.tensor(6.0 / sd**2), edm[1], edm[2], edm[3]]))


@pytest.mark.parametrize("bad", [{"sigma_overlap": 1.5}, {"sigma_order": "sideways"}])
def test_bad_coupling_settings_are_refused(bad):
    with pytest.raises(UserError, match="patches.sigma_"):
        PatchConfig(**bad).check()


def test_a_non_positive_snr_cap_is_refused():
    with pytest.raises(UserError, match="edm.snr_cap"):
        EDMConfig(snr_cap=0.0).check()
