"""Denoiser networks: shapes, adaLN-Zero start, coordinate-based positions, conditioning, checkpointing."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from latentpatch.conditioning import Conditioning
from latentpatch.config import load_config
from latentpatch.errors import UserError
from latentpatch.models import DiTConfig, ModelConfig, UNetConfig, build_network
from latentpatch.patches import coordinate_grid, full_coordinates

C = 4
TINY_DIT = ModelConfig(arch="dit", dit=DiTConfig(hidden_size=32, depth=2, num_heads=2, patch_size=2))
TINY_UNET = ModelConfig(arch="unet", unet=UNetConfig(block_out_channels=[16, 32], layers_per_block=1,
                                                     attention_levels=[False, True]))


def coords(full_h: int, full_w: int, batch: int = 1) -> torch.Tensor:
    return full_coordinates(batch, full_h, full_w)


def net_input(batch: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.randn(batch, C, h, w, generator=g), coords(h, w, batch)], dim=1)


def build(cfg: ModelConfig, seed: int = 0, perturb: bool = False) -> torch.nn.Module:
    """Build with a fixed seed; `perturb` adds noise to every weight so zero-init layers pass signal."""
    torch.manual_seed(seed)
    net = build_network(cfg, C, device="cpu")
    if perturb:
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1 * torch.randn_like(p))
    return net.eval()


TEXT = Conditioning(text_tokens=torch.randn(2, 5, 12), text_mask=torch.tensor([[1, 1, 1, 0, 0], [1] * 5]).bool())


@pytest.mark.parametrize("hw", [(8, 8), (16, 16), (16, 8)])
@pytest.mark.parametrize(
    "cfg,cond",
    [
        (TINY_DIT, None),
        (dataclasses.replace(TINY_DIT, text_dim=12), TEXT),
        (TINY_UNET, None),
        (dataclasses.replace(TINY_UNET, num_classes=3), Conditioning(class_labels=torch.tensor([0, 3]))),
        (dataclasses.replace(TINY_UNET, text_dim=12), TEXT),
    ],
    ids=["dit", "dit-text", "unet", "unet-class", "unet-text"],
)
def test_each_image_is_denoised_alone_at_latent_shape_for_square_and_non_square_inputs(cfg, cond, hw):
    net, x, sigma = build(cfg, perturb=True), net_input(2, *hw), torch.tensor([0.3, 2.0])
    out = net(x, sigma, cond)
    assert out.shape == (2, C, *hw)
    # A batch is a batch of independent problems: each row equals that image denoised on its own, and the
    # second image's output differs from the first's (noise level, input and conditioning all reach it).
    for i in range(2):
        alone = net(x[i : i + 1], sigma[i : i + 1], None if cond is None else _row(cond, i))
        torch.testing.assert_close(out[i : i + 1], alone, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out[0], out[1], atol=1e-3)


def _row(cond: Conditioning, i: int) -> Conditioning:
    return Conditioning(**{f.name: None if getattr(cond, f.name) is None else getattr(cond, f.name)[i : i + 1]
                           for f in dataclasses.fields(cond)})


def test_dit_output_is_exactly_zero_at_init():
    for cfg, cond in [(TINY_DIT, None), (dataclasses.replace(TINY_DIT, text_dim=12, num_classes=3), TEXT)]:
        out = build(cfg)(net_input(2, 8, 16), torch.randn(2), cond)
        assert torch.equal(out, torch.zeros_like(out))


def test_crop_gets_exactly_the_full_grid_position_embedding_at_its_place():
    pos = build(TINY_DIT).pos_embedder
    top, left, ph, pw = 4, 8, 8, 6
    full_emb = pos(coordinate_grid(16, 24)[None]).view(1, 8, 12, -1)
    crop_emb = pos(coordinate_grid(16, 24, top, left, ph, pw)[None]).view(1, 4, 3, -1)
    assert torch.equal(crop_emb, full_emb[:, top // 2 : (top + ph) // 2, left // 2 : (left + pw) // 2])


def test_same_size_crops_at_different_places_get_different_embeddings_and_outputs():
    net = build(TINY_DIT, perturb=True)
    full = coords(16, 16)
    a, b = full[:, :, 0:8, 0:8], full[:, :, 8:16, 4:12]
    emb_a, emb_b = net.pos_embedder(a), net.pos_embedder(b)
    assert not torch.allclose(emb_a, emb_b)
    # a token's embedding is unique on the grid: no two tokens of the full grid share one
    full_emb = net.pos_embedder(full)[0]
    assert torch.cdist(full_emb, full_emb).add(torch.eye(64) * 1e9).min() > 0.1
    content = torch.randn(1, C, 8, 8)
    c_noise = torch.zeros(1)
    assert not torch.allclose(net(torch.cat([content, a], 1), c_noise), net(torch.cat([content, b], 1), c_noise))


def test_unconditional_models_have_no_label_or_text_parameters():
    dit = build(TINY_DIT)
    assert dit.y_embedder is None and dit.text_embedder is None and dit.pooled_embedder is None
    assert not any("cross_attn" in name for name, _ in dit.named_parameters())
    assert build(TINY_UNET).unet.class_embedding is None
    labelled = build(dataclasses.replace(TINY_DIT, num_classes=5))
    assert labelled.y_embedder.embedding_table.num_embeddings == 6  # + the null label


@pytest.mark.parametrize("base", [TINY_DIT, TINY_UNET], ids=["dit", "unet"])
def test_class_conditional_output_depends_on_label_and_missing_label_means_null(base):
    net = build(dataclasses.replace(base, num_classes=3), perturb=True)
    x, t = net_input(1, 8, 8), torch.zeros(1)
    outs = [net(x, t, Conditioning(class_labels=torch.tensor([k]))) for k in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.allclose(outs[i], outs[j])
    assert torch.equal(net(x, t, None), outs[3])


@pytest.mark.parametrize("base", [TINY_DIT, TINY_UNET], ids=["dit", "unet"])
def test_text_output_depends_on_real_tokens_but_not_on_padding(base):
    net = build(dataclasses.replace(base, text_dim=12, pooled_text_dim=6), perturb=True)
    x, t = net_input(1, 8, 8), torch.zeros(1)
    tokens, mask = torch.randn(1, 5, 12), torch.tensor([[True, True, True, False, False]])
    pooled = torch.randn(1, 6)
    out = net(x, t, Conditioning(text_tokens=tokens, text_mask=mask, text_pooled=pooled))
    padded = tokens.clone()
    padded[:, 3:] = 100 * torch.randn(1, 2, 12)
    same = net(x, t, Conditioning(text_tokens=padded, text_mask=mask, text_pooled=pooled))
    torch.testing.assert_close(same, out, atol=1e-6, rtol=0)
    changed = tokens.clone()
    changed[:, 1] += 1.0
    changed_out = net(x, t, Conditioning(text_tokens=changed, text_mask=mask, text_pooled=pooled))
    assert not torch.allclose(changed_out, out)
    other_pooled = net(x, t, Conditioning(text_tokens=tokens, text_mask=mask, text_pooled=pooled + 1))
    assert not torch.allclose(other_pooled, out)


def test_dit_caption_without_real_tokens_gives_finite_output():
    net = build(dataclasses.replace(TINY_DIT, text_dim=12), perturb=True)
    cond = Conditioning(text_tokens=torch.randn(1, 4, 12), text_mask=torch.zeros(1, 4, dtype=torch.bool))
    assert torch.isfinite(net(net_input(1, 8, 8), torch.zeros(1), cond)).all()


def test_text_model_without_tokens_is_a_user_error():
    with pytest.raises(UserError, match="text_tokens"):
        build(dataclasses.replace(TINY_DIT, text_dim=12))(net_input(1, 8, 8), torch.zeros(1), None)


def test_grad_checkpointing_gives_the_same_gradients():
    grads, block_calls = [], []
    for ckpt in (False, True):
        net = build(dataclasses.replace(TINY_DIT, text_dim=12, grad_checkpointing=ckpt), perturb=True).train()
        calls, block_forward = [], net.blocks[0].forward
        net.blocks[0].forward = lambda *a: (calls.append(1), block_forward(*a))[1]
        c_noise = torch.randn(2, generator=torch.Generator().manual_seed(1))
        net(net_input(2, 8, 8), c_noise, TEXT).square().sum().backward()
        grads.append({n: p.grad for n, p in net.named_parameters()})
        block_calls.append(len(calls))
    assert block_calls == [1, 2]  # checkpointing recomputes the block in backward
    assert grads[0].keys() == grads[1].keys()
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, msg=name)


@pytest.mark.parametrize(
    "cfg,hw,match",
    [
        (TINY_DIT, (8, 7), "8x7.*patch size 2"),
        (dataclasses.replace(TINY_DIT, dit=DiTConfig(hidden_size=32, depth=2, num_heads=2, patch_size=4)), (6, 8),
         "6x8.*patch size 4"),
        (TINY_UNET, (8, 5), "8x5.*divisible by 2"),
    ],
)
def test_size_not_divisible_by_patch_is_a_user_error(cfg, hw, match):
    with pytest.raises(UserError, match=match):
        build(cfg)(net_input(1, *hw), torch.zeros(1))


def test_presets_follow_the_dit_paper():
    cfg = DiTConfig(preset="DiT-XL/2")
    assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == (28, 1152, 16, 2)
    assert DiTConfig(preset="DiT-B/4").patch_size == 4
    with pytest.raises(UserError, match="DiT-M/2"):
        DiTConfig(preset="DiT-M/2")


def test_a_field_that_disagrees_with_the_preset_is_refused_not_silently_overridden():
    with pytest.raises(UserError, match="preset DiT-XL/2 has hidden_size 1152, but model.dit.hidden_size is 32"):
        DiTConfig(preset="DiT-XL/2", hidden_size=32).check()
    with pytest.raises(UserError, match="preset DiT-B/2 has hidden_size 768, but model.dit.hidden_size is 384"):
        DiTConfig(preset="DiT-B/2", hidden_size=384).check()  # built in Python too, where it equals the default
    with pytest.raises(UserError, match="preset DiT-B/2 has hidden_size 768, but model.dit.hidden_size is 384"):
        load_config("dit-b2", ["model.dit.hidden_size=384"])  # explicit, even where it equals the default
    assert load_config("dit-b2", ["model.dit.hidden_size=768"]).model.dit.hidden_size == 768  # agreeing is fine
    assert load_config("dit-b2", ["model.dit.preset=null", "model.dit.hidden_size=480"]).model.dit.hidden_size == 480


def test_a_dit_given_neither_preset_nor_fields_is_dit_s2_and_fields_alone_keep_the_rest():
    assert DiTConfig() == DiTConfig(hidden_size=384, depth=12, num_heads=6, patch_size=2)
    cfg = DiTConfig(hidden_size=32, depth=2, num_heads=2)
    assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.patch_size) == (32, 2, 2, 2)


def test_dit_s2_parameter_count_is_near_the_papers_33m():
    with torch.device("meta"):
        net = build_network(ModelConfig(dit=DiTConfig(preset="DiT-S/2")), C, device="cpu")
    n = sum(p.numel() for p in net.parameters())
    assert 31e6 < n < 34e6, n


def test_bad_config_is_a_user_error_at_load():
    with pytest.raises(UserError, match="model.arch"):
        load_config(None, ["model.arch=mlp"])
    with pytest.raises(UserError, match="model.unet.attention_levels"):
        load_config("unet-small", ["model.unet.attention_levels=[true]"])
    with pytest.raises(UserError, match="model.dit.hidden_size=30"):
        load_config(None, ["model.dit.hidden_size=30", "model.dit.num_heads=3"])


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dit_trains_on_cuda_in_bf16_autocast_with_checkpointing():
    cfg = dataclasses.replace(TINY_DIT, text_dim=12, num_classes=3, grad_checkpointing=True)
    net = build_network(cfg, C).cuda().train()
    cond = Conditioning(class_labels=torch.tensor([0, 3]).cuda(), text_tokens=TEXT.text_tokens.cuda(),
                        text_mask=TEXT.text_mask.cuda())
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = net(net_input(2, 16, 8).cuda(), torch.randn(2, device="cuda"), cond)
    (out.float() - 1).square().mean().backward()
    assert out.shape == (2, C, 16, 8)
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    assert net.final_layer.linear.weight.grad.abs().sum() > 0


def test_routing_every_token_is_bit_identical_to_the_plain_dit():
    from latentpatch.models.routing import TokenRoute

    net = build(dataclasses.replace(TINY_DIT, dit=DiTConfig(hidden_size=32, depth=4, num_heads=2)))
    x, t = net_input(2, 8, 8), torch.tensor([0.3, -0.7])
    with torch.no_grad():
        plain = net(x, t)
        everyone = net(x, t, route=TokenRoute(torch.arange(16).repeat(2, 1), 1, 2))
    assert torch.equal(plain, everyone)


def test_routed_tokens_skip_the_routed_blocks_and_rejoin_unchanged():
    """The kept tokens (ascending, distinct) are all that enter the routed blocks."""
    from latentpatch.models.routing import TokenRoute, kept_tokens

    net = build(dataclasses.replace(TINY_DIT, dit=DiTConfig(hidden_size=32, depth=4, num_heads=2)))
    keep = kept_tokens(2, 16, 0.5, torch.Generator().manual_seed(0))
    assert keep.shape == (2, 8) and bool((keep[:, 1:] > keep[:, :-1]).all())  # ascending, distinct
    seen = {}
    net.blocks[1].register_forward_hook(lambda m, args, out: seen.update(tokens=args[0].shape[1]))
    with torch.no_grad():
        net(net_input(2, 8, 8), torch.zeros(2), route=TokenRoute(keep, 1, 2))
    assert seen["tokens"] == 8  # half of the 4 x 4 tokens went through block 1
    with torch.no_grad():
        net(net_input(2, 8, 8), torch.zeros(2))
    assert seen["tokens"] == 16  # without a route (sampling) every token does


def test_route_out_puts_the_routed_tokens_back_in_place_and_leaves_the_others_as_they_were():
    from latentpatch.models.routing import TokenRoute, route_in, route_out

    before = torch.randn(2, 6, 4)
    route = TokenRoute(torch.tensor([[0, 3, 4], [1, 2, 5]]), 0, 0)
    routed = route_in(before, route)
    assert torch.equal(routed[1], before[1, [1, 2, 5]])
    after = route_out(routed + 1, before, route)
    assert torch.equal(after[0, [0, 3, 4]], before[0, [0, 3, 4]] + 1) and torch.equal(after[0, [1, 2, 5]],
                                                                                      before[0, [1, 2, 5]])
    assert torch.equal(after[1, [0, 3, 4]], before[1, [0, 3, 4]])
