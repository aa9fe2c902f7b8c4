"""`--cache step` on the flow-matching transformers (SD3 / FLUX, latentpatch.sampling.caches.step): diffusers'
TaylorSeer hooks on their blocks' attention and feed-forwards, through latentpatch's wrappers."""

from __future__ import annotations

import pytest
import torch
from flow_helpers import CLIP_WIDTHS, LATENT_CHANNELS, T5_WIDTH, tiny_flux_transformer, tiny_sd3_transformer

from latentpatch.conditioning import Conditioning
from latentpatch.diffusion.flow import FlowPrecond
from latentpatch.errors import UserError
from latentpatch.models.flow_base import wrap_flow_transformer
from latentpatch.patches import full_coordinates
from latentpatch.sampling.caches import check_cache, job_cache


@pytest.fixture(scope="module", params=["sd3", "flux"])
def flow(request):
    transformer = tiny_sd3_transformer() if request.param == "sd3" else tiny_flux_transformer()
    pooled = sum(CLIP_WIDTHS) if request.param == "sd3" else CLIP_WIDTHS[0]
    gen = torch.Generator().manual_seed(2)
    cond = Conditioning(text_tokens=torch.randn(2, 4, T5_WIDTH, generator=gen),
                        text_pooled=torch.randn(2, pooled, generator=gen))
    return FlowPrecond(wrap_flow_transformer(transformer)).eval(), cond


def _run(precond, cache, xs, sigmas, cond):
    coords = full_coordinates(xs[0].shape[0], 8, 8)
    with torch.no_grad(), job_cache(precond, cache) as source:
        denoiser = source.fresh()
        return [denoiser(x, s.expand(x.shape[0]), coords, cond) for x, s in zip(xs, sigmas)]


def _inputs(n: int):
    gen = torch.Generator().manual_seed(1)
    return [torch.randn(2, LATENT_CHANNELS, 8, 8, generator=gen) for _ in range(n)], torch.linspace(3.0, 0.5, n)


def test_interval_1_is_the_uncached_denoiser(flow):
    precond, cond = flow
    xs, sigmas = _inputs(4)
    for a, b in zip(_run(precond, "step:interval=1", xs, sigmas, cond), _run(precond, None, xs, sigmas, cond)):
        assert torch.equal(a, b)


def test_a_cached_call_reuses_its_blocks_and_the_hooks_leave_with_the_job(flow):
    precond, cond = flow
    xs, sigmas = _inputs(3)
    before = {k: v.clone() for k, v in precond.state_dict().items()}
    # order 0, warmup 1, interval 2: call 0 full, call 1 reuses call 0's attention and feed-forward outputs
    same = _run(precond, "step:interval=2,order=0,warmup=1", [xs[0], xs[0]], sigmas[:1].repeat(2), cond)
    torch.testing.assert_close(same[1], same[0], rtol=0, atol=1e-5)  # same input: reuse changes nothing
    cached = _run(precond, "step:interval=2,order=0,warmup=1", xs[:2], sigmas[:2], cond)
    plain = _run(precond, None, xs[:2], sigmas[:2], cond)
    torch.testing.assert_close(cached[0], plain[0], rtol=0, atol=0)
    assert (cached[1] - plain[1]).abs().amax() > 1e-4  # the reused parts did not see the new input
    assert (cached[1] - cached[0]).abs().amax() > 1e-2  # the parts it recomputes did
    assert not any(hasattr(m, "_diffusers_hook") for m in precond.modules())
    assert all(torch.equal(v, before[k]) for k, v in precond.state_dict().items())


def test_the_methods_a_flow_transformer_cannot_take_are_refused_in_one_line(flow):
    precond, _ = flow
    for cache in ("ras", "deepcache"):
        with pytest.raises(UserError, match=rf"^--cache {cache} is for .*; this run.s network is an? (SD3|FLUX) "
                                            r"transformer: use --cache step$"):
            check_cache(precond, cache)
