"""SDXL's UNet with patches: a crop's place as SDXL's own micro-conditioning (time ids), exactly the UNet call the
pipeline makes for that crop; the DDPM objective equal to diffusers' SDXL training example's loss, zero terminal SNR
included; each bucket's images conditioned on their own size."""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F
from sdxl_helpers import CLIP_WIDTHS, LATENT_CHANNELS, SDXL_SCHEDULER, ZSNR_SCHEDULER, tiny_sdxl_unet

from latentpatch.conditioning import Conditioning
from latentpatch.diffusion.ddpm import DDPMObjective, VPConfig
from latentpatch.diffusion.vp import VPPrecond
from latentpatch.errors import UserError
from latentpatch.models.sdxl import SDXLNetwork
from latentpatch.patches import crop_coordinates, full_coordinates

FACTOR = 8  # SDXL's VAE: 8 pixels per latent pixel


@pytest.fixture(scope="module")
def unet():
    return tiny_sdxl_unet().eval()


def _cond(b, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Conditioning(text_tokens=torch.randn(b, 77, sum(CLIP_WIDTHS), generator=g),
                        text_pooled=torch.randn(b, CLIP_WIDTHS[1], generator=g))


def _pipeline_time_ids(unet, original_size, crop, target_size):
    """StableDiffusionXLPipeline._get_add_time_ids, the pipeline's own function (it reads only its UNet)."""
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline._get_add_time_ids(types.SimpleNamespace(unet=unet), original_size, crop,
                                                        target_size, torch.float32,
                                                        text_encoder_projection_dim=CLIP_WIDTHS[1])


# (top, left, full h, full w) in latent pixels: one batch of 4x4 crops from images of three sizes (buckets)
CROPS = [(0, 0, 8, 8), (3, 1, 8, 8), (2, 6, 6, 10), (8, 0, 12, 6)]


def _crop_batch():
    tops, lefts = torch.tensor([c[0] for c in CROPS]), torch.tensor([c[1] for c in CROPS])
    coords = [crop_coordinates(tops[i:i + 1], lefts[i:i + 1], 4, 4, CROPS[i][2], CROPS[i][3]) for i in range(4)]
    return torch.cat(coords)


def test_each_crops_time_ids_are_the_pipelines_for_that_crop_in_pixels(unet):
    net = SDXLNetwork(unet, FACTOR)
    got = net.time_ids(_crop_batch(), torch.float32)
    for i, (top, left, h, w) in enumerate(CROPS):
        want = _pipeline_time_ids(unet, (h * FACTOR, w * FACTOR), (top * FACTOR, left * FACTOR), (32, 32))
        assert torch.equal(got[i:i + 1], want)


def test_at_full_size_the_time_ids_are_the_pipelines_defaults(unet):
    """original_size = target_size = (height, width), crops_coords_top_left = (0, 0): what the pipeline gives."""
    net = SDXLNetwork(unet, FACTOR)
    got = net.time_ids(full_coordinates(2, 6, 10), torch.float32)
    want = _pipeline_time_ids(unet, (48, 80), (0, 0), (48, 80))
    assert torch.equal(got, want.expand(2, 6))


def test_the_wrapped_unet_is_the_unets_call_with_the_same_added_conditioning(unet):
    net, cond = SDXLNetwork(unet, FACTOR), _cond(4)
    x = torch.randn(4, LATENT_CHANNELS, 4, 4, generator=torch.Generator().manual_seed(2))
    t = torch.tensor([999.0, 500.0, 1.0, 250.0])
    time_ids = torch.cat([_pipeline_time_ids(unet, (h * FACTOR, w * FACTOR), (y * FACTOR, x0 * FACTOR), (32, 32))
                          for y, x0, h, w in CROPS])
    with torch.no_grad():
        ours = net(torch.cat([x, _crop_batch()], 1), t, cond)
        stock = unet(x, t, cond.text_tokens, added_cond_kwargs={"text_embeds": cond.text_pooled,
                                                                 "time_ids": time_ids}).sample
    assert torch.equal(ours, stock)


def test_a_crops_place_changes_the_output_and_channels_never_reach_the_stock_unet(unet):
    net, cond = SDXLNetwork(unet, FACTOR), _cond(2)
    x = torch.randn(1, LATENT_CHANNELS, 4, 4, generator=torch.Generator().manual_seed(3)).expand(2, -1, -1, -1)
    coords = _crop_batch()[:2]
    assert net.stock_weights and net.unet.conv_in.in_channels == LATENT_CHANNELS
    with torch.no_grad():
        out = net(torch.cat([x, coords], 1), torch.tensor([400.0, 400.0]), Conditioning(
            text_tokens=cond.text_tokens[:1].expand(2, -1, -1), text_pooled=cond.text_pooled[:1].expand(2, -1)))
    assert not torch.equal(out[0], out[1])  # same input, other offset: other time ids


def _example_loss(unet, noise_scheduler, x0, noise, timesteps, cond, time_ids, snr_gamma=None):
    """The loss lines of diffusers' examples/text_to_image/train_text_to_image_sdxl.py, after the draws."""
    from diffusers.training_utils import compute_snr

    noisy_model_input = noise_scheduler.add_noise(x0, noise, timesteps)
    unet_added_conditions = {"time_ids": time_ids, "text_embeds": cond.text_pooled}
    model_pred = unet(noisy_model_input, timesteps, cond.text_tokens, added_cond_kwargs=unet_added_conditions).sample
    if noise_scheduler.config.prediction_type == "epsilon":
        target = noise
    else:
        target = noise_scheduler.get_velocity(x0, noise, timesteps)
    if snr_gamma is None:
        return F.mse_loss(model_pred.float(), target.float(), reduction="mean"), noisy_model_input
    snr = compute_snr(noise_scheduler, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        snr = snr + 1
    mse_loss_weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0] / snr
    loss = F.mse_loss(model_pred.float(), target.float(), reduction="none")
    return (loss.mean(dim=list(range(1, len(loss.shape)))) * mse_loss_weights).mean(), noisy_model_input


@pytest.mark.parametrize("scheduler,snr_gamma", [(SDXL_SCHEDULER, None), (SDXL_SCHEDULER, 5.0),
                                                 (ZSNR_SCHEDULER, None), (ZSNR_SCHEDULER, 5.0)])
def test_the_ddpm_loss_is_the_sdxl_examples_loss_for_the_same_draws(unet, scheduler, snr_gamma):
    from diffusers import DDPMScheduler

    objective = DDPMObjective(VPConfig("ddpm", snr_gamma), scheduler)
    precond = VPPrecond(SDXLNetwork(unet, FACTOR), scheduler)
    g = torch.Generator().manual_seed(4)
    x0, noise = torch.randn(4, LATENT_CHANNELS, 8, 8, generator=g), torch.randn(4, LATENT_CHANNELS, 8, 8, generator=g)
    cond, coords = _cond(4), full_coordinates(4, 8, 8)
    sigma = objective.draw_sigmas(4, torch.Generator().manual_seed(5))
    timesteps = torch.randint(0, 1000, (4,), generator=torch.Generator().manual_seed(5))  # the example's draw
    assert torch.equal(objective.timesteps(sigma), timesteps)
    if scheduler is ZSNR_SCHEDULER:  # and the last timestep, where the signal is gone
        timesteps[0], sigma[0] = 999, objective.table[999]
    noise_scheduler = DDPMScheduler.from_config(scheduler)  # the example's DDPMScheduler.from_pretrained
    time_ids = _pipeline_time_ids(unet, (64, 64), (0, 0), (64, 64)).expand(4, 6)
    with torch.no_grad():
        want, x_t = _example_loss(unet, noise_scheduler, x0, noise, timesteps, cond, time_ids, snr_gamma)
        ours = objective.loss(precond, x0, coords, sigma, noise, cond)
    torch.testing.assert_close(ours.mean(), want, rtol=1e-6, atol=0)
    if scheduler is ZSNR_SCHEDULER:
        assert torch.equal(x_t[0], noise[0])  # a_{T-1} = 0 exactly: x_t is the noise, the v target -x0


def test_zero_terminal_snr_stands_its_last_timestep_by_a_finite_sigma_that_maps_back_exactly(unet):
    objective = DDPMObjective(VPConfig("ddpm"), ZSNR_SCHEDULER)
    assert float(objective.noise_scheduler.alphas_cumprod[-1]) == 0.0  # infinite sigma in the DDPM table
    last = objective.table[-1]
    assert torch.isfinite(last) and float(last) == pytest.approx((1 - 2**-24) ** 0.5 / 2**-12, rel=1e-6)
    precond = VPPrecond(SDXLNetwork(unet, FACTOR), ZSNR_SCHEDULER)
    assert float(precond.timestep(last.reshape(1))) == 999.0
    assert int(objective.timesteps(last.reshape(1))) == 999


def test_the_ddpm_heldout_levels_are_the_mid_quantiles_of_the_uniform_timesteps():
    objective = DDPMObjective(VPConfig("ddpm"), SDXL_SCHEDULER)
    assert torch.equal(objective.heldout_sigmas(4), objective.table[[125, 375, 625, 875]])


def test_the_objective_settings_that_cannot_work_are_refused_in_one_line():
    from latentpatch.config import load_config

    with pytest.raises(UserError, match=r"^vp.snr_gamma with an epsilon model of zero terminal SNR divides"):
        DDPMObjective(VPConfig("ddpm", 5.0), {**ZSNR_SCHEDULER, "prediction_type": "epsilon"})
    with pytest.raises(UserError, match=r"^vp.objective=ddpm trains a DDPM base's own prediction; it needs edm"):
        load_config(None, ["vp.objective=ddpm"])
    with pytest.raises(UserError, match=r"^vp.snr_gamma weights the DDPM loss"):
        load_config(None, ["vp.snr_gamma=5"])


def test_every_crop_of_a_bucketed_batch_is_conditioned_on_its_own_images_size(unet):
    """Two buckets (8x12 and 12x8 latents): each drawn crop's time ids hold its own image's size and the offset it
    was cut at, read here from the crop's values (each latent pixel holds its image, row and column)."""
    from latentpatch.conditioning import ConditioningSpec
    from latentpatch.patches import PatchStage
    from latentpatch.training.batches import BatchSpec, draw_batch
    from latentpatch.training.rows import TrainingRows

    def latents(n, h, w, first):
        i, y, x = torch.meshgrid(torch.arange(first, first + n), torch.arange(h), torch.arange(w), indexing="ij")
        return {"mean": (i * 10000 + y * 100 + x).float()[:, None].expand(n, LATENT_CHANNELS, h, w).contiguous()}

    parts = [latents(3, 8, 12, 0), latents(3, 12, 8, 3)]
    rows = TrainingRows.split(parts, torch.tensor([0, 0, 0, 1, 1, 1]), {}, None, (10, 10))
    objective = DDPMObjective(VPConfig("ddpm"), SDXL_SCHEDULER)
    spec = BatchSpec(seed=3, objective=objective, conditioning=ConditioningSpec(), label_dropout=0.0,
                     caption_dropout=0.0, crop_multiple=1, coordinate_scale="per-axis")
    batch = draw_batch(rows, spec, PatchStage(4, 4, 1.0, 16), 16, 0, 0, 0, 1, torch.device("cpu"))
    got = SDXLNetwork(unet, FACTOR).time_ids(batch.coords, torch.float32)
    corner = batch.x0[:, 0, 0, 0].long()
    image, top, left = corner // 10000, corner % 10000 // 100, corner % 100
    sizes = torch.tensor([[8, 12] if i < 3 else [12, 8] for i in image.tolist()])
    want = torch.cat([sizes, top[:, None], left[:, None], torch.full((16, 2), 4)], 1) * FACTOR
    assert torch.equal(got, want.float())
    assert len(set(sizes[:, 0].tolist())) == 2  # both buckets in the one batch


def _deepcache_run(precond, cache, xs, sigmas, coords, cond):
    from latentpatch.sampling.caches import job_cache

    with job_cache(precond, cache) as source, torch.no_grad():
        denoiser = source.fresh()
        return [denoiser(x, s.expand(len(x)), coords, cond) for x, s in zip(xs, sigmas)]


def test_deepcache_serves_the_sdxl_unet_through_its_own_blocks(unet):
    """--cache deepcache on SDXL's UNet: every call full (interval=1) is the plain denoiser bit for bit; a cached
    call on the last full call's input gives its output (the shallow path is wired to what it reuses); on a new
    input it differs from the plain denoiser (the deep blocks were reused)."""
    precond = VPPrecond(SDXLNetwork(unet, FACTOR), SDXL_SCHEDULER).eval()
    g = torch.Generator().manual_seed(6)
    xs = [torch.randn(2, LATENT_CHANNELS, 8, 8, generator=g) for _ in range(3)]
    sigmas, coords, cond = torch.tensor([10.0, 3.0, 1.0]), full_coordinates(2, 8, 8), _cond(2)
    plain = _deepcache_run(precond, None, xs, sigmas, coords, cond)
    every = _deepcache_run(precond, "deepcache:interval=1", xs, sigmas, coords, cond)
    assert all(torch.equal(a, b) for a, b in zip(every, plain))
    same = _deepcache_run(precond, "deepcache:interval=2,warmup=1", xs[:1] * 2, sigmas[:1].repeat(2), coords, cond)
    torch.testing.assert_close(same[1], plain[0], rtol=0, atol=1e-5)
    new = _deepcache_run(precond, "deepcache:interval=2,warmup=1", xs[:2], sigmas[:2], coords, cond)
    assert torch.equal(new[0], plain[0]) and (new[1] - plain[1]).abs().amax() > 1e-4
    assert not any(hasattr(m, "_diffusers_hook") for m in unet.modules())  # removed: the UNet as it was


def _widened(unet):
    """The "channels" arm of benchmarks/finetune/sdxl_channels.py: conv_in widened by two zero-initialised coordinate
    inputs, in_channels C+2 in the config, the other weights the stock UNet's."""
    from diffusers import UNet2DConditionModel

    from latentpatch.models.widen import CoordinateConv2d

    wide = UNet2DConditionModel.from_config({**unet.config, "in_channels": LATENT_CHANNELS + 2}).eval()
    state = dict(unet.state_dict())
    state["conv_in.weight"] = CoordinateConv2d.widen(unet.conv_in).weight.detach()
    wide.load_state_dict(state)
    return wide


def test_a_widened_conv_in_at_zero_is_the_stock_network_bit_for_bit_and_then_reads_the_crops_place(unet):
    stock, wide = SDXLNetwork(unet, FACTOR), SDXLNetwork(_widened(unet), FACTOR)
    assert wide.coordinate_inputs == 2 and not wide.stock_weights and wide.latent_channels == LATENT_CHANNELS
    assert stock.coordinate_inputs == 0 and wide.lora_trainable == ("unet.conv_in.",)
    cond = _cond(4)
    x = torch.cat([torch.randn(4, LATENT_CHANNELS, 4, 4, generator=torch.Generator().manual_seed(4)), _crop_batch()], 1)
    t = torch.tensor([999.0, 500.0, 1.0, 250.0])
    with torch.no_grad():
        assert torch.equal(wide(x, t, cond), stock(x, t, cond))
        wide.unet.conv_in.weight[:, LATENT_CHANNELS:] = 0.01
        assert not torch.allclose(wide(x, t, cond), stock(x, t, cond), atol=1e-4)


def test_an_sdxl_base_with_extra_inputs_is_refused_though_a_widened_run_loads(unet):
    from latentpatch.models.sdxl import check_sdxl_unet

    config = {**unet.config, "in_channels": LATENT_CHANNELS + 2}
    with pytest.raises(UserError, match="6 input channels for 4-channel latents"):
        check_sdxl_unet(config)  # a base folder: an inpainting-style UNet
    check_sdxl_unet(config, widened_ok=True)  # a run's config: the coordinate channels
