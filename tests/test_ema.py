"""EMA: EDM's half-life in images with ramp-up (NVlabs/edm training/training_loop.py), and the update itself."""

import math

import pytest
import torch
from torch import nn

from latentpatch.training.ema import ema_beta, make_ema, update_ema


def test_beta_halves_the_old_weight_after_one_halflife_of_images():
    # 500 kimg half-life, no ramp-up: a "batch" of 500k images leaves exactly half of the old average.
    assert ema_beta(cur_nimg=10**9, batch_nimg=500_000, halflife_kimg=500, rampup=None) == pytest.approx(0.5)
    # Two batches of half that size compose to the same half.
    assert ema_beta(10**9, 250_000, 500, None) ** 2 == pytest.approx(0.5)


@pytest.mark.parametrize("cur,batch,ramp,beta", [
    (10_000, 500, 0.05, 0.5),          # ramp-up: the half-life is 5% of 10,000 images = 500, one batch of it
    (10_000, 1_000, 0.05, 0.25),       # two half-lives in one batch
    (10_000, 250, 0.05, 2 ** -0.5),    # half a half-life
    (10**9, 1_000_000, None, 0.25),    # no ramp-up: the configured 500 kimg, two of them in one batch
    (10**9, 1_000_000, 0.05, 0.25),    # late in training the configured half-life is the smaller one
])
def test_beta_is_one_half_per_halflife_of_images(cur, batch, ramp, beta):
    assert ema_beta(cur, batch, 500, ramp) == pytest.approx(beta, rel=1e-12)


def test_rampup_caps_the_halflife_at_a_fraction_of_images_seen():
    # 1000 images seen, ramp-up 0.05 -> half-life 50 images, far below the configured 500k.
    assert ema_beta(1000, 50, 500, 0.05) == pytest.approx(0.5)
    # Late in training the configured half-life takes over again.
    late = ema_beta(10**9, 64, 500, 0.05)
    assert late == pytest.approx(0.5 ** (64 / 500_000))


def test_first_step_with_rampup_copies_the_weights():
    assert ema_beta(0, 64, 500, 0.05) == 0.0


def test_without_rampup_the_first_step_uses_the_full_halflife():
    assert ema_beta(0, 64, 500, None) == pytest.approx(0.5 ** (64 / 500_000))


def test_update_is_beta_old_plus_one_minus_beta_new_and_copies_buffers():
    torch.manual_seed(0)
    net = nn.BatchNorm1d(3)
    with torch.no_grad():
        net.weight.copy_(torch.tensor([1.0, 2.0, 3.0]))
        net.bias.copy_(torch.tensor([-1.0, 0.0, 1.0]))
    ema = make_ema(net)
    assert not ema.training and not any(p.requires_grad for p in ema.parameters())
    with torch.no_grad():
        net.weight.copy_(torch.tensor([3.0, 2.0, 1.0]))
        net.running_mean.fill_(7.0)
    update_ema(ema, net, beta=0.75)
    torch.testing.assert_close(ema.weight, torch.tensor([1.5, 2.0, 2.5]))  # 0.75*old + 0.25*new
    torch.testing.assert_close(ema.bias, torch.tensor([-1.0, 0.0, 1.0]))
    assert torch.equal(ema.running_mean, torch.full((3,), 7.0))


def test_a_run_of_updates_follows_the_closed_form_average():
    # Constant target w and constant beta: ema_k = w + beta^k (ema_0 - w).
    net = nn.Linear(1, 1, bias=False)
    ema = make_ema(net)
    start = ema.weight.item()
    with torch.no_grad():
        net.weight.fill_(2.0)
    beta = ema_beta(10**9, 100_000, 500, None)
    for _ in range(5):
        update_ema(ema, net, beta)
    expected = 2.0 + beta**5 * (start - 2.0)
    assert math.isclose(ema.weight.item(), expected, rel_tol=1e-6)


def test_the_ema_of_a_partly_frozen_module_holds_its_frozen_weights_once():
    """A LoRA fine-tune's base does not train: the EMA shares those tensors (one copy of a 12 B base, not two) and
    averages only what trains."""
    from torch import nn

    module = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    module[0].requires_grad_(False)
    ema = make_ema(module)
    assert ema[0].weight is module[0].weight and ema[0].bias is module[0].bias
    assert ema[1].weight is not module[1].weight and torch.equal(ema[1].weight, module[1].weight)
    before = ema[1].weight.clone()
    with torch.no_grad():
        module[1].weight.add_(1.0)
    update_ema(ema, module, beta=0.5)
    torch.testing.assert_close(ema[1].weight, before + 0.5)
    assert ema[0].weight is module[0].weight
