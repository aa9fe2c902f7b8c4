"""TREAD token routing (Krause et al. 2025): during training a random share of each sample's tokens skips a
run of DiT blocks and rejoins, unchanged, after it; no new parameters, and sampling uses every token.

The kept tokens are drawn with the batch (training.batches), so routing is a function of (seed, step) like
every other random choice, and equal in 1 and N processes. They stay in their original order, so with share
0 the routed path computes exactly what the plain one does.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class TokenRoute(NamedTuple):
    keep: Tensor  # [B, k] ascending token indices that go through blocks start..end
    start: int  # first routed block
    end: int  # last routed block (inclusive)

    def select(self, rows: slice) -> TokenRoute:
        return TokenRoute(self.keep[rows], self.start, self.end)


def kept_tokens(batch: int, tokens: int, share: float, generator: torch.Generator) -> Tensor:
    """[batch, tokens - round(share * tokens)] random token indices per sample, ascending."""
    keep = tokens - round(share * tokens)
    scores = torch.rand(batch, tokens, generator=generator, device=generator.device)
    return scores.argsort(dim=1)[:, :keep].sort(dim=1).values


def route_in(tokens: Tensor, route: TokenRoute) -> Tensor:
    """[B, T, D] -> [B, k, D]: the tokens that enter the routed blocks."""
    return tokens.gather(1, route.keep[..., None].expand(-1, -1, tokens.shape[-1]))


def route_out(routed: Tensor, before: Tensor, route: TokenRoute) -> Tensor:
    """The full sequence again: the routed tokens' new values, every other token as it was before the route."""
    return before.scatter(1, route.keep[..., None].expand(-1, -1, before.shape[-1]), routed)
