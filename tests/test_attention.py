"""The attention switch: each backend computes softmax(QK^T/sqrt(d))V, with key padding masks."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from latentpatch.errors import UserError
from latentpatch.models import DiTConfig, ModelConfig, UNetConfig, build_network
from latentpatch.models import attention as attn_module
from latentpatch.models.attention import attention, resolve_backend


def reference_attention(q, k, v, mask=None):
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    return scores.softmax(dim=-1) @ v


def _qkv(b=2, heads=3, lq=7, lk=5, d=8, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(b, heads, n, d, generator=g).to(device, dtype) for n in (lq, lk, lk)]


def test_sdpa_matches_explicit_softmax_attention():
    q, k, v = _qkv()
    torch.testing.assert_close(attention(q, k, v, backend="sdpa"), reference_attention(q, k, v))


def test_sdpa_key_padding_mask_matches_reference_and_ignores_padded_values():
    q, k, v = _qkv()
    mask = torch.tensor([[True, True, False, False, False], [True, True, True, True, False]])
    out = attention(q, k, v, mask=mask, backend="sdpa")
    torch.testing.assert_close(out, reference_attention(q, k, v, mask))
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 2:] += 5.0
    v2[0, :, 2:] -= 7.0
    torch.testing.assert_close(attention(q, k2, v2, mask=mask, backend="sdpa"), out)


def test_auto_picks_sdpa_on_cpu():
    assert resolve_backend("auto", "cpu") == "sdpa"
    assert resolve_backend("sdpa", "cuda") == "sdpa"


def test_auto_picks_xformers_only_on_cuda_when_it_imports(monkeypatch):
    monkeypatch.setattr(attn_module, "_xformers_problem", lambda device: None)
    assert resolve_backend("auto", "cuda") == "xformers"
    assert resolve_backend("auto", torch.device("cpu")) == "sdpa"
    monkeypatch.setattr(attn_module, "_xformers_problem", lambda device: "NotImplementedError: no kernels")
    assert resolve_backend("auto", "cuda") == "sdpa"


def test_requesting_xformers_on_cpu_says_it_needs_cuda():
    with pytest.raises(UserError, match="needs a CUDA device"):
        resolve_backend("xformers", "cpu")


def test_requesting_xformers_that_does_not_run_says_why(monkeypatch):
    monkeypatch.setattr(attn_module, "_xformers_problem", lambda device: "ModuleNotFoundError: no xformers")
    with pytest.raises(UserError, match="does not run here.*no xformers"):
        resolve_backend("xformers", "cuda")


def test_masked_attention_runs_through_sdpa_whatever_the_backend():
    """A key-padding mask never builds xFormers' dense [B, heads, Lq, Lk] bias: it goes through SDPA (no xFormers
    import is needed, so this runs on the CPU)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 8, generator=g) for _ in range(3))
    mask = torch.tensor([[True, True, False, False, False, False, False], [True] * 7])
    k, v = torch.randn(2, 3, 7, 8, generator=g), torch.randn(2, 3, 7, 8, generator=g)
    assert torch.equal(attention(q, k, v, mask=mask, backend="xformers"), attention(q, k, v, mask=mask, backend="sdpa"))


def test_xformers_problem_is_reported_not_raised_on_cpu():
    assert attn_module._xformers_problem("cpu") is not None  # not installed, or no CPU kernels


def test_unknown_backend_is_a_user_error():
    with pytest.raises(UserError, match="flash"):
        resolve_backend("flash", "cpu")


def test_network_stores_the_backend_chosen_at_construction():
    net = build_network(ModelConfig(dit=DiTConfig(hidden_size=32, depth=2, num_heads=2), text_dim=8), 4, device="cpu")
    assert net.attention_backend == "sdpa"
    backends = {m.backend for m in net.modules() if hasattr(m, "backend")}
    assert backends == {"sdpa"}


needs_cuda_and_xformers = pytest.mark.skipif(
    not torch.cuda.is_available() or attn_module._xformers_problem("cuda") is not None,
    reason="needs CUDA and a working xformers",
)


@pytest.mark.cuda
@needs_cuda_and_xformers
def test_xformers_matches_sdpa_on_cuda_in_bf16():
    q, k, v = _qkv(b=2, heads=4, lq=67, lk=13, d=64, dtype=torch.bfloat16, device="cuda")
    mask = torch.ones(2, 13, dtype=torch.bool, device="cuda")
    mask[0, 5:] = False
    for m in (None, mask):
        torch.testing.assert_close(
            attention(q, k, v, mask=m, backend="xformers"),
            attention(q, k, v, mask=m, backend="sdpa"),
            atol=2e-2, rtol=2e-2,
        )


def _perturbed_cuda_net(cfg: ModelConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    net = build_network(cfg, 4, device="cuda")
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net.cuda().eval()


@pytest.mark.cuda
@needs_cuda_and_xformers
@pytest.mark.parametrize(
    "cfg",
    [
        ModelConfig(arch="dit", dit=DiTConfig(hidden_size=64, depth=2, num_heads=2), text_dim=16),
        ModelConfig(arch="unet", unet=UNetConfig(block_out_channels=[32, 64], attention_levels=[False, True]),
                    text_dim=16),
    ],
    ids=["dit", "unet"],
)
def test_networks_with_xformers_match_sdpa_on_cuda_in_bf16(cfg):
    from latentpatch.conditioning import Conditioning

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 16, 8, generator=g).cuda()
    cond = Conditioning(
        text_tokens=torch.randn(2, 11, 16, generator=g).cuda(),
        text_mask=torch.tensor([[True] * 4 + [False] * 7, [True] * 11]).cuda(),
    )
    outs = []
    for backend in ("sdpa", "xformers"):
        net = _perturbed_cuda_net(dataclasses.replace(cfg, attention=backend))
        assert net.attention_backend == backend
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            outs.append(net(x, torch.zeros(2, device="cuda"), cond).float())
    torch.testing.assert_close(outs[1], outs[0], atol=5e-2, rtol=5e-2)
