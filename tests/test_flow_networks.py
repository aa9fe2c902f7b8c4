"""SD3 / SD3.5 / FLUX.1 transformers as Patch Diffusion networks: stock weights, positions from the coordinates.

At full size each wrapper is the stock diffusers transformer called as its pipeline calls it; a crop's tokens get
exactly the full image's positions at those tokens (SD3's table window, FLUX's rotary ids)."""

from __future__ import annotations

import pytest
import torch
from flow_helpers import CLIP_WIDTHS, LATENT_CHANNELS, T5_WIDTH, tiny_flux_transformer, tiny_sd3_transformer

from latentpatch.conditioning import Conditioning
from latentpatch.errors import UserError
from latentpatch.models.flux import FluxNetwork, crop_image_ids
from latentpatch.models.sd3 import SD3Network, crop_pos_embed
from latentpatch.models.token_grid import token_grid
from latentpatch.patches import crop_coordinates, full_coordinates

SHAPES = [(16, 8), (8, 16)]  # latent (h, w), both orientations of a non-square image
OFFSETS = [(0, 0), (2, 2), (4, 0), (0, 4), (8, 0)]  # (top, left) in latent pixels, multiples of the patch size 2


def _inputs(b: int, h: int, w: int, text: int = 7, pooled: int = sum(CLIP_WIDTHS), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(b, LATENT_CHANNELS, h, w, generator=g)
    cond = Conditioning(text_tokens=torch.randn(b, text, T5_WIDTH, generator=g),
                        text_pooled=torch.randn(b, pooled, generator=g))
    timestep = torch.tensor([1000.0, 437.5, 12.0, 700.0][:b])
    return latent, cond, timestep


def _crop_coords(offsets, ph, pw, h, w):
    tops = torch.tensor([o[0] for o in offsets])
    lefts = torch.tensor([o[1] for o in offsets])
    return crop_coordinates(tops, lefts, ph, pw, h, w)


@pytest.mark.parametrize("sd35", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_sd3_full_size_is_the_stock_transformer_bit_for_bit(sd35, shape):
    h, w = shape
    net = SD3Network(tiny_sd3_transformer(sd35)).eval()
    latent, cond, timestep = _inputs(3, h, w)
    with torch.no_grad():
        ours = net(torch.cat([latent, full_coordinates(3, h, w)], 1), timestep, cond)
        stock = net.transformer(hidden_states=latent, encoder_hidden_states=cond.text_tokens,
                                pooled_projections=cond.text_pooled, timestep=timestep, return_dict=False)[0]
    assert torch.equal(ours, stock)


@pytest.mark.parametrize("shape", SHAPES)
def test_sd3_crop_gets_the_full_images_table_window_at_its_tokens(shape):
    h, w = shape
    embed = tiny_sd3_transformer().pos_embed
    full = embed.cropped_pos_embed(h, w).reshape(h // 2, w // 2, -1)  # what the stock model gives the full image
    ph, pw = 4, 4
    offsets = [(t, l_) for t, l_ in OFFSETS if t + ph <= h and l_ + pw <= w]
    grid = token_grid(_crop_coords(offsets, ph, pw, h, w), 2)
    got = crop_pos_embed(embed, grid, ph // 2, pw // 2).reshape(len(offsets), ph // 2, pw // 2, -1)
    for i, (top, left) in enumerate(offsets):
        assert torch.equal(got[i], full[top // 2:top // 2 + ph // 2, left // 2:left // 2 + pw // 2])
    assert not torch.equal(got[0], got[1])  # different offsets, different positions


def test_sd3_batch_of_crops_from_two_shapes_each_keeps_its_own_image():
    """A crop step mixing aspect buckets: each sample's window follows its own full image; the network output of
    each crop equals that crop run alone."""
    net = SD3Network(tiny_sd3_transformer()).eval()
    latent, cond, timestep = _inputs(2, 4, 4)
    coords = torch.cat([_crop_coords([(8, 2)], 4, 4, 16, 8), _crop_coords([(2, 8)], 4, 4, 8, 16)])
    grid = token_grid(coords, 2)
    assert grid.full_h.tolist() == [8, 4] and grid.full_w.tolist() == [4, 8]
    assert grid.top.tolist() == [4, 1] and grid.left.tolist() == [1, 4]
    with torch.no_grad():
        both = net(torch.cat([latent, coords], 1), timestep, cond)
        alone = net(torch.cat([latent[1:], coords[1:]], 1), timestep[1:], cond.select(slice(1, 2)))
    torch.testing.assert_close(both[1:], alone, rtol=1e-5, atol=1e-6)


def test_a_crop_off_the_token_grid_is_refused():
    net = SD3Network(tiny_sd3_transformer())
    latent, cond, timestep = _inputs(1, 4, 4)
    coords = _crop_coords([(1, 2)], 4, 4, 16, 8)
    with pytest.raises(UserError, match="patches.aligned=true"):
        net(torch.cat([latent, coords], 1), timestep, cond)


def test_an_image_larger_than_the_sd3_table_is_refused():
    net = SD3Network(tiny_sd3_transformer())
    latent, cond, timestep = _inputs(1, 4, 4)
    coords = _crop_coords([(0, 0)], 4, 4, 28, 8)  # 14 tokens high; the table has 12
    with pytest.raises(UserError, match="pos_embed_max_size"):
        net(torch.cat([latent, coords], 1), timestep, cond)


def _flux_stock(transformer, latent, cond, timestep, ids, guidance):
    """FluxPipeline's call of the transformer: packed latents, timestep / 1000, zero text ids."""
    from diffusers import FluxPipeline

    b, c, h, w = latent.shape
    out = transformer(hidden_states=FluxPipeline._pack_latents(latent, b, c, h, w), timestep=timestep / 1000,
                      guidance=guidance, pooled_projections=cond.text_pooled, encoder_hidden_states=cond.text_tokens,
                      txt_ids=torch.zeros(cond.text_tokens.shape[1], 3), img_ids=ids, return_dict=False)[0]
    return FluxPipeline._unpack_latents(out, h * 8, w * 8, 8)  # as the pipeline unpacks (vae_scale_factor 8)


@pytest.mark.parametrize("shape", SHAPES)
def test_flux_full_size_is_the_stock_transformer_with_the_pipelines_inputs(shape):
    from diffusers import FluxPipeline

    h, w = shape
    net = FluxNetwork(tiny_flux_transformer()).eval()
    latent, cond, timestep = _inputs(3, h, w, pooled=CLIP_WIDTHS[0])
    ids = FluxPipeline._prepare_latent_image_ids(3, h // 2, w // 2, "cpu", torch.float32)
    with torch.no_grad():
        ours = net(torch.cat([latent, full_coordinates(3, h, w)], 1), timestep, cond)
        stock = _flux_stock(net.transformer, latent, cond, timestep, ids, torch.full([1], 3.5).expand(3))
        other = net(torch.cat([latent, full_coordinates(3, h, w)], 1), timestep, cond, guidance=5.0)
    assert torch.equal(ours, stock)
    assert not torch.allclose(other, ours)  # the distilled guidance input is used


@pytest.mark.parametrize("shape", SHAPES)
def test_flux_crop_ids_are_the_full_images_ids_at_its_tokens(shape):
    from diffusers import FluxPipeline

    h, w = shape
    full = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.float32).reshape(h // 2, w // 2, 3)
    ph, pw = 4, 6
    offsets = [(t, l_) for t, l_ in OFFSETS if t + ph <= h and l_ + pw <= w]
    grid = token_grid(_crop_coords(offsets, ph, pw, h, w), 2)
    for i, (top, left) in enumerate(offsets):
        got = crop_image_ids(grid, i, ph // 2, pw // 2, torch.device("cpu"))
        want = full[top // 2:top // 2 + ph // 2, left // 2:left // 2 + pw // 2].reshape(-1, 3)
        assert torch.equal(got, want)


def test_flux_batch_of_crops_is_each_crop_with_its_own_ids():
    """Crops at three offsets (two share one) in one batch: each equals the stock transformer on that crop
    with the full image's ids at its tokens."""
    from diffusers import FluxPipeline

    h, w, ph, pw = 16, 8, 4, 4
    net = FluxNetwork(tiny_flux_transformer(), guidance_scale=2.0).eval()
    latent, cond, timestep = _inputs(4, ph, pw, pooled=CLIP_WIDTHS[0])
    offsets = [(4, 2), (0, 0), (4, 2), (12, 4)]
    full = FluxPipeline._prepare_latent_image_ids(1, h // 2, w // 2, "cpu", torch.float32).reshape(h // 2, w // 2, 3)
    with torch.no_grad():
        ours = net(torch.cat([latent, _crop_coords(offsets, ph, pw, h, w)], 1), timestep, cond)
        for i, (top, left) in enumerate(offsets):
            ids = full[top // 2:top // 2 + ph // 2, left // 2:left // 2 + pw // 2].reshape(-1, 3)
            stock = _flux_stock(net.transformer, latent[i:i + 1], cond.select(slice(i, i + 1)), timestep[i:i + 1],
                                ids, torch.full([1], 2.0))
            torch.testing.assert_close(ours[i:i + 1], stock, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours[0], ours[2])  # same offset, different inputs: still two samples


def test_flux_schnell_has_no_guidance_input():
    net = FluxNetwork(tiny_flux_transformer(guidance_embeds=False)).eval()
    latent, cond, timestep = _inputs(2, 8, 8, pooled=CLIP_WIDTHS[0])
    with torch.no_grad():
        out = net(torch.cat([latent, full_coordinates(2, 8, 8)], 1), timestep, cond)
    assert out.shape == latent.shape and torch.isfinite(out).all()


def test_the_wrappers_keep_the_stock_state_dict():
    """Nothing is added to the weights: the fine-tune's transformer saves as the stock class."""
    sd3, flux = tiny_sd3_transformer(), tiny_flux_transformer()
    assert {k.removeprefix("transformer.") for k in SD3Network(sd3).state_dict()} == set(sd3.state_dict())
    assert {k.removeprefix("transformer.") for k in FluxNetwork(flux).state_dict()} == set(flux.state_dict())


@pytest.mark.parametrize("kind", ["sd3", "flux"])
def test_gradient_checkpointing_gives_the_same_gradients(kind):
    def grads(checkpointing: bool):
        if kind == "sd3":
            net, pooled = SD3Network(tiny_sd3_transformer()), sum(CLIP_WIDTHS)
        else:
            net, pooled = FluxNetwork(tiny_flux_transformer()), CLIP_WIDTHS[0]
        if checkpointing:
            net.transformer.enable_gradient_checkpointing()
        latent, cond, timestep = _inputs(2, 4, 4, pooled=pooled)
        coords = _crop_coords([(2, 0), (4, 4)], 4, 4, 8, 8)
        net(torch.cat([latent, coords], 1), timestep[:2], cond).square().mean().backward()
        return [p.grad for p in net.parameters()]

    for plain, checkpointed in zip(grads(False), grads(True)):
        torch.testing.assert_close(checkpointed, plain, rtol=1e-5, atol=1e-7)
