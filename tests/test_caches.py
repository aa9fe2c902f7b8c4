"""The sampling caches at the denoiser: each reuses exactly what it says, on the calls the schedule says, and is
the plain denoiser where it computes everything (latentpatch.sampling.caches)."""

from __future__ import annotations

import pytest
import torch
from export_helpers import TINY_DIT, TINY_UNET

from latentpatch.conditioning import Conditioning
from latentpatch.config import load_config
from latentpatch.denoiser import build_precond
from latentpatch.errors import UserError
from latentpatch.patches import full_coordinates
from latentpatch.sampling.caches import job_cache
from latentpatch.sampling.caches.ras import from_tokens, to_tokens
from latentpatch.sampling.caches.schedule import is_full
from latentpatch.sampling.caches.spec import parse_cache

UNET3 = [o for o in TINY_UNET if "block_out" not in o and "attention_levels" not in o] + [
    "model.unet.block_out_channels=[16,32,32]", "model.unet.attention_levels=[false,true,true]"]


def _precond(overrides: list[str], seed: int = 0) -> torch.nn.Module:
    """A network with every weight nudged (adaLN-Zero and zero-initialised projections too), so nothing is 0."""
    precond = build_precond(load_config(None, overrides), 3, device="cpu").eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in precond.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=gen))
    return precond


@pytest.fixture(scope="module")
def dit():
    return _precond(TINY_DIT + ["model.num_classes=3"])


@pytest.fixture(scope="module")
def text_dit():
    return _precond(TINY_DIT + ["model.text_dim=8"])


@pytest.fixture(scope="module")
def unet():
    return _precond(UNET3 + ["model.num_classes=3"])


@pytest.fixture(scope="module")
def dit_xl(tmp_path_factory):
    """A fine-tune of a tiny diffusers DiTTransformer2DModel (DiT-XL/2's classes) on 4 x 8 x 8 latents."""
    from export_helpers import finetune_run
    from pretrained_helpers import make_dit_pipeline

    from latentpatch.runs import load_run

    root = tmp_path_factory.mktemp("dit_xl")
    return load_run(finetune_run(root / "run", make_dit_pipeline(root / "pipeline")), device="cpu").precond


def _inputs(n: int, batch: int = 2, side: int = 8, seed: int = 1, channels: int = 3):
    gen = torch.Generator().manual_seed(seed)
    xs = [torch.randn(batch, channels, side, side, generator=gen) for _ in range(n)]
    sigmas = torch.linspace(2.0, 0.5, n)
    return xs, sigmas, full_coordinates(batch, side, side)


def _cond(net_kind: str, batch: int = 2):
    if net_kind == "text":
        gen = torch.Generator().manual_seed(5)
        return Conditioning(text_tokens=torch.randn(batch, 3, 8, generator=gen), text_mask=torch.ones(batch, 3))
    return Conditioning(class_labels=torch.arange(batch) % 3)


def _run(precond, cache, xs, sigmas, coords, cond):
    with job_cache(precond, cache) as source:
        denoiser = source.fresh()
        return [denoiser(x, s.expand(x.shape[0]), coords, cond) for x, s in zip(xs, sigmas)]


@pytest.mark.parametrize("net,cache", [("dit", "step:interval=1"), ("dit", "ras:interval=1"),
                                       ("text_dit", "step:interval=1,order=2"), ("unet", "deepcache:interval=1"),
                                       ("dit_xl", "step:interval=1"), ("dit_xl", "ras:interval=1")])
def test_interval_1_computes_every_call_and_is_the_uncached_denoiser(net, cache, request):
    precond = request.getfixturevalue(net)
    xs, sigmas, coords = _inputs(5, channels=4 if net == "dit_xl" else 3)
    cond = _cond("text" if net == "text_dit" else "class")
    plain = _run(precond, None, xs, sigmas, coords, cond)
    for a, b in zip(_run(precond, cache, xs, sigmas, coords, cond), plain):
        assert torch.equal(a, b)


@pytest.mark.parametrize("net,cache,cached_call", [
    ("dit", "step:interval=2,order=0,warmup=1", 1), ("dit", "step:interval=2,order=1,warmup=2", 2),
    ("text_dit", "step:interval=3,order=2,warmup=3", 3), ("dit", "ras:ratio=0.5,interval=3,warmup=2", 2),
    ("text_dit", "ras:ratio=0.25,interval=3,warmup=2", 2), ("unet", "deepcache:level=0,interval=2", 1),
    ("unet", "deepcache:level=1,interval=2", 1), ("dit_xl", "step:interval=2,order=1,warmup=2", 2),
    ("dit_xl", "ras:ratio=0.5,interval=3,warmup=2", 2)])
def test_a_cached_call_on_the_last_full_calls_input_gives_their_output(net, cache, cached_call, request):
    # Everything reused was computed from this very input, so reusing it must change nothing (to float rounding):
    # this checks what each cache recomputes (shallow path, routed tokens and their keys) is wired to what it reuses.
    precond = request.getfixturevalue(net)
    xs, sigmas, coords = _inputs(1, channels=4 if net == "dit_xl" else 3)
    cond = _cond("text" if net == "text_dit" else "class")
    n = cached_call + 1
    assert not is_full(cached_call, parse_cache(cache).settings["warmup"], parse_cache(cache).settings["interval"])
    outs = _run(precond, cache, xs * n, sigmas[:1].repeat(n), coords, cond)
    full = _run(precond, None, xs, sigmas[:1], coords, cond)[0]
    for out in outs:
        torch.testing.assert_close(out, full, rtol=0, atol=1e-5)


def _counting(module: torch.nn.Module, handles: list) -> list[int]:
    calls: list[int] = []
    handles.append(module.register_forward_hook(lambda *_: calls.append(1)))
    return calls


def _parts(net, spec):
    """(modules that must run on every call, modules that run on full calls only) of the cache's network."""
    if spec.method == "deepcache":
        u, level = net.unet, spec.settings["level"]  # a block's first conv runs when the block is computed
        fresh = [u.conv_in] + [b.resnets[0].conv1 for b in (u.down_blocks[level], u.up_blocks[-1 - level])]
        return fresh, [b.resnets[0].conv1 for b in (u.down_blocks[level + 1], u.mid_block, u.up_blocks[-2 - level])]
    if spec.method == "step":  # adaLN runs, attention and MLP are extrapolated
        return [net.x_embedder, net.blocks[0].adaLN_modulation, net.final_layer], [net.blocks[0].attn.qkv,
                                                                                   net.blocks[1].mlp[0]]
    return [net.x_embedder, net.blocks[1].mlp, net.final_layer], []  # ras: every block, on fewer tokens


@pytest.mark.parametrize("cache", ["step:interval=3,warmup=2", "deepcache:interval=3,warmup=2,level=0",
                                   "deepcache:interval=3,warmup=2,level=1", "ras:interval=3,warmup=2,ratio=0.5"])
def test_the_reused_parts_run_on_the_full_calls_of_the_schedule_only(cache, unet):
    spec = parse_cache(cache)
    precond = unet if spec.method == "deepcache" else _precond(TINY_DIT + ["model.num_classes=3"])
    every, full_only = _parts(precond.net, spec)
    handles: list = []
    counts = [_counting(m, handles) for m in every + full_only]
    xs, sigmas, coords = _inputs(9)
    _run(precond, cache, xs, sigmas, coords, _cond("class"))
    for handle in handles:
        handle.remove()
    full = [c for c in range(9) if is_full(c, spec.settings["warmup"], spec.settings["interval"])]
    assert full == [0, 1, 3, 6]
    assert [len(c) for c in counts] == [9] * len(every) + [len(full)] * len(full_only)


@pytest.mark.parametrize("net,cache", [("dit", "step:interval=2,order=0,warmup=1"), ("text_dit", "step:warmup=1"),
                                       ("dit", "ras:warmup=2"), ("unet", "deepcache:level=0"),
                                       ("unet", "deepcache:level=1"), ("dit_xl", "ras:warmup=2"),
                                       ("dit_xl", "step:warmup=1")])
def test_a_cached_call_on_a_new_input_is_neither_the_last_output_nor_the_full_networks(net, cache, request):
    precond = request.getfixturevalue(net)
    warmup = parse_cache(cache).settings["warmup"]
    xs, sigmas, coords = _inputs(warmup + 1, channels=4 if net == "dit_xl" else 3)
    cond = _cond("text" if net == "text_dit" else "class")
    outs = _run(precond, cache, xs, sigmas, coords, cond)
    plain = _run(precond, None, xs, sigmas, coords, cond)
    assert (outs[-1] - outs[-2]).abs().amax() > 1e-2  # the parts it recomputes see the new input
    assert (outs[-1] - plain[-1]).abs().amax() > 1e-4  # the parts it reuses do not


def test_ras_reuses_the_left_out_tokens_outputs_and_updates_the_chosen_ones(dit):
    xs, sigmas, coords = _inputs(3)
    cond = _cond("class")
    outs = _run(dit, "ras:ratio=0.25,interval=4,warmup=2", xs, sigmas, coords, cond)
    plain = _run(dit, None, xs, sigmas, coords, cond)
    torch.testing.assert_close(outs[1], plain[1], rtol=0, atol=0)  # warm-up calls are the plain denoiser
    # D = c_skip x + c_out F: recover the network's own output F, the thing reused per token
    from latentpatch.diffusion.edm import precond_coefficients

    def net_out(D, x, sigma):
        c_skip, c_out, _, _ = precond_coefficients(torch.tensor(float(sigma)), dit.sigma_data)
        return to_tokens((D - c_skip * x) / c_out, 2)

    before, now = net_out(outs[1], xs[1], sigmas[1]), net_out(outs[2], xs[2], sigmas[2])
    same = (before - now).abs().amax(-1) < 1e-5  # [B, T]: tokens whose output is the one kept
    assert same.sum(1).tolist() == [12, 12]  # 16 tokens, 4 updated per image
    fresh = net_out(plain[2], xs[2], sigmas[2])
    changed = ~same
    assert not torch.allclose(now[changed], fresh[changed], atol=1e-4)  # updated with stale neighbours' keys
    assert (now[changed] - before[changed]).abs().amax() > 1e-3


@pytest.mark.parametrize("net", ["dit", "dit_xl"])
def test_ras_with_every_token_chosen_is_the_full_network(net, request):
    precond = request.getfixturevalue(net)
    xs, sigmas, coords = _inputs(4, channels=4 if net == "dit_xl" else 3)
    cond = _cond("class")
    outs = _run(precond, "ras:ratio=1,interval=4,warmup=2", xs, sigmas, coords, cond)
    plain = _run(precond, None, xs, sigmas, coords, cond)
    for a, b in zip(outs, plain):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_tokens_and_back_is_the_identity():
    out = torch.randn(2, 3, 4, 6)
    assert torch.equal(from_tokens(to_tokens(out, 2), out.shape, 2), out)
    assert torch.equal(to_tokens(out, 2)[0, 1], out[0, :, 0:2, 2:4].permute(1, 2, 0).reshape(-1))


def test_the_hooks_are_gone_after_the_job_and_the_network_is_as_loaded(dit, unet, dit_xl):
    for precond, cache in ((dit, "step"), (dit, "ras"), (unet, "deepcache"), (dit_xl, "step"), (dit_xl, "ras")):
        keys = {k: v.clone() for k, v in precond.state_dict().items()}
        with job_cache(precond, cache):
            assert any("_diffusers_hook" in m.__dict__ for m in precond.modules())
        assert not any("_diffusers_hook" in m.__dict__ or "forward" in m.__dict__ for m in precond.modules())
        assert all(torch.equal(v, keys[k]) for k, v in precond.state_dict().items())


@pytest.mark.parametrize("net,cache,message", [
    ("dit", "deepcache", r"^--cache deepcache is for UNets; this run's network is this project's DiT: use --cache "
                         r"step or ras$"),
    ("unet", "ras", r"^--cache ras is for DiTs; this run's network is a UNet: use --cache deepcache$"),
    ("unet", "step", r"^--cache step is for DiTs, SD3 / FLUX; this run's network is a UNet: use --cache deepcache$"),
    ("unet", "deepcache:level=2", r"^--cache deepcache: level=2 leaves nothing to reuse in this UNet of 3 levels; "
                                  r"use a level from 0 to 1$"),
])
def test_a_method_that_does_not_fit_the_network_is_refused_in_one_line(net, cache, message, request):
    with pytest.raises(UserError, match=message):
        with job_cache(request.getfixturevalue(net), cache):
            pass
