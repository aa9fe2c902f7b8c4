"""Region-adaptive sampling for the DiTs (RAS: Liu et al. 2025, arXiv:2502.10389, microsoft/RAS).

On a cached call only a `ratio` share of each image's tokens goes through the blocks (the DiTs' token route,
models/routing.py, from the first block to the last); the other tokens keep the output of their last computation.
In self-attention the routed tokens see every token: the keys and values of the tokens left out are the ones kept
from their last computation, as RAS does (this project's DiT keeps them; diffusers' DiT-XL/2 keeps each
attention's input and computes them again from it, through its own attention processor). A full call (the first `warmup`, then one in `interval`) computes every
token and refreshes every cache.

Which tokens: RAS ranks them by how much their output moves; here a token's score is the change of its output
between its last two computations per call in between, times the calls since it was last computed, an estimate
of how stale its reused output is by now, which also keeps a token from being left out for ever (RAS's
starvation term). Every row keeps its own tokens, outputs and keys, so an image does not depend on its batch;
the guidance halves of an image are two rows and choose their tokens apart.
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import ModelHook
from torch import Tensor, nn

from latentpatch.models.attention import attention
from latentpatch.models.routing import TokenRoute
from latentpatch.sampling.caches.hooks import register, remove
from latentpatch.sampling.caches.schedule import CallCounter

HOOK = "latentpatch_ras"


def to_tokens(out: Tensor, p: int) -> Tensor:
    """[B, C, h, w] -> [B, (h/p)(w/p), p*p*C], row-major tokens as the DiT's."""
    b, c, h, w = out.shape
    return out.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), -1)


def from_tokens(tokens: Tensor, shape: torch.Size, p: int) -> Tensor:
    b, c, h, w = shape
    return tokens.reshape(b, h // p, w // p, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(b, c, h, w)


class _Regions(ModelHook):
    """On the DiT: chooses each cached call's tokens, routes them, and merges their outputs into the kept ones."""

    def __init__(self, cache: RegionCache) -> None:
        super().__init__()
        self.cache = cache

    def new_forward(self, module: nn.Module, x: Tensor, c_noise: Tensor, cond: Any = None) -> Tensor:
        cache = self.cache
        if cache.counter.advance() or cache.last is None:
            cache.keep = None
            out = self.fn_ref.original_forward(x, c_noise, cond)
        else:
            cache.keep = cache.choose()
            out = self.fn_ref.original_forward(x, c_noise, cond, route=TokenRoute(cache.keep, 0, cache.depth - 1))
        return cache.observe(out)


class _Keys(ModelHook):
    """On each self-attention: the keys and values of the tokens a cached call leaves out, from their last
    computation."""

    def __init__(self, cache: RegionCache) -> None:
        super().__init__()
        self.cache = cache
        self.clear()

    def clear(self) -> None:
        self.k = self.v = None

    def new_forward(self, module: nn.Module, x: Tensor) -> Tensor:
        q, k, v = module.heads(x)
        keep = self.cache.keep
        if keep is not None:
            index = keep[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
            k, v = self.k.scatter(2, index, k), self.v.scatter(2, index, v)
        self.k, self.v = k, v
        return module.project(attention(q, k, v, backend=module.backend))


class _Inputs(ModelHook):
    """On each self-attention of diffusers' DiT: the inputs of the tokens a cached call leaves out, from their last
    computation, given as the attention's key/value input (diffusers' `encoder_hidden_states`)."""

    def __init__(self, cache: RegionCache) -> None:
        super().__init__()
        self.cache = cache
        self.clear()

    def clear(self) -> None:
        self.inputs = None

    def new_forward(self, module: nn.Module, hidden_states: Tensor, encoder_hidden_states: Tensor | None = None,
                    **kwargs: Any) -> Tensor:
        keep = self.cache.keep
        if keep is None:
            self.inputs = hidden_states
            return self.fn_ref.original_forward(hidden_states, encoder_hidden_states, **kwargs)
        index = keep[..., None].expand(-1, -1, hidden_states.shape[-1])
        self.inputs = self.inputs.scatter(1, index, hidden_states)
        return self.fn_ref.original_forward(hidden_states, self.inputs, **kwargs)


def _attentions(net: nn.Module) -> tuple[list[nn.Module], type[ModelHook]]:
    """Each block's self-attention and the hook that lets routed tokens see the others."""
    from latentpatch.models.pretrained_dit import PretrainedDiT

    if isinstance(net, PretrainedDiT):
        return [block.attn1 for block in net.transformer.transformer_blocks], _Inputs
    return [block.attn for block in net.blocks], _Keys


class RegionCache:
    def __init__(self, net: nn.Module, settings: dict[str, Any]) -> None:
        attentions, hook = _attentions(net)
        self.net, self.ratio, self.depth, self.p = net, float(settings["ratio"]), len(attentions), net.patch_size
        self.counter = CallCounter(int(settings["warmup"]), int(settings["interval"]))
        self.keys = [hook(self) for _ in attentions]
        register(net, _Regions(self), HOOK)
        for attention_module, key_hook in zip(attentions, self.keys):
            register(attention_module, key_hook, HOOK)
        self.reset()

    def reset(self) -> None:
        self.counter.reset()
        self.keep: Tensor | None = None  # [B, k] the tokens this call computes; None: all
        self.last: Tensor | None = None  # [B, T, P] each token's output at its last computation
        self.rate: Tensor | None = None  # [B, T] its output's change per call, measured then (inf: not yet)
        self.since: Tensor | None = None  # [B, T] calls since then
        for hook in self.keys:
            hook.clear()

    def choose(self) -> Tensor:
        """[B, k] ascending: the tokens with the largest expected change since their last computation."""
        count = max(1, round(self.ratio * self.last.shape[1]))
        score = self.rate * (self.since + 1)
        return score.topk(count, dim=1).indices.sort(dim=1).values

    def observe(self, out: Tensor) -> Tensor:
        """The call's output with the tokens it left out taken from their last computation; updates the record."""
        tokens = to_tokens(out, self.p)
        if self.keep is None:
            merged, computed = tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=out.device)
        else:
            index = self.keep[..., None].expand(-1, -1, tokens.shape[-1])
            merged = self.last.scatter(1, index, tokens.gather(1, index))
            computed = torch.zeros(tokens.shape[:2], dtype=torch.bool, device=out.device).scatter(1, self.keep, True)
        if self.last is None:
            self.rate = torch.full(tokens.shape[:2], torch.inf, device=out.device)
            self.since = torch.zeros(tokens.shape[:2], device=out.device)
        else:
            change = (merged - self.last).float().pow(2).mean(-1).sqrt() / (self.since + 1)
            self.rate = torch.where(computed, change, self.rate)
            self.since = torch.where(computed, 0.0, self.since + 1)
        self.last = merged
        return out if self.keep is None else from_tokens(merged, out.shape, self.p)

    def remove(self) -> None:
        remove(self.net, HOOK)
