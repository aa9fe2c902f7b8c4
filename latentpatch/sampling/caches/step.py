"""The step cache for the DiTs: diffusers' TaylorSeer hook (Liu et al. 2025, arXiv:2503.06923; with order 0 it
is FORA's plain reuse, Selvaraju et al. 2024) on each block's attention and MLP. On a full call they run and
their outputs are kept; on the others their outputs are extrapolated from the last full calls (a Taylor series
in the call index, `order` terms) and the blocks do only the cheap rest: adaLN, norms, gates and residuals.

Why TaylorSeer and not diffusers' FirstBlockCache or MagCache, which also hook these blocks: those decide
whether to skip from a statistic of the whole batch (a mean over every image), so an image would change with
its batch-mates and a resumed job would not make the images a whole one makes. TaylorSeer skips on a fixed
schedule and keeps its history per row: image i is the same in any batch. PyramidAttentionBroadcast and
FasterCache hook diffusers' own Attention classes only (and FasterCache approximates the guidance half itself).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache
from diffusers.hooks.hooks import CacheContext, StateManager
from torch import nn

from latentpatch.models.dit import DiT
from latentpatch.sampling.caches.hooks import remove

HOOK = "taylorseer_cache"  # the name apply_taylorseer_cache registers its hooks under
# re.fullmatch patterns (names under the hooked module) of the sub-modules whose outputs are cached, by the
# wrapper's class name: this project's DiT; the diffusers transformer inside PretrainedDiT, SD3Network and
# FluxNetwork (the joint blocks' attention and both feed-forwards; FLUX's single blocks' attention, as diffusers'
# own TaylorSeer defaults hook FLUX)
JOINT = [r"transformer_blocks\.\d+\.(attn|ff|ff_context)"]
PATTERNS = {"DiT": [r"blocks\.\d+\.(attn|cross_attn|mlp)"],
            "PretrainedDiT": [r"transformer_blocks\.\d+\.(attn1|attn2|ff)"],
            "SD3Network": JOINT,
            "FluxNetwork": JOINT + [r"single_transformer_blocks\.\d+\.attn"]}


def taylorseer_config(settings: dict[str, Any], network: str) -> TaylorSeerCacheConfig:
    """diffusers' TaylorSeer config of a `step` spec's settings for a network (a wrapper's class name in
    PATTERNS). The exported FLUX pipeline takes the same config (exporting/stock_flow_pipeline.py)."""
    return TaylorSeerCacheConfig(
        cache_interval=int(settings["interval"]), disable_cache_before_step=int(settings["warmup"]),
        max_order=int(settings["order"]), taylor_factors_dtype=torch.float32, cache_identifiers=PATTERNS[network])


def _target(net: nn.Module) -> nn.Module:
    """The module holding the blocks: the DiT itself, or the diffusers transformer inside the wrapper."""
    return net if isinstance(net, DiT) else net.transformer


class StepCache:
    def __init__(self, net: nn.Module, settings: dict[str, Any]) -> None:
        self.root = _target(net)
        apply_taylorseer_cache(self.root, taylorseer_config(settings, type(net).__name__))
        self.managers: list[StateManager] = [m._diffusers_hook.get_hook(HOOK).state_manager
                                             for m in self.root.modules()
                                             if getattr(m, "_diffusers_hook", None) and m._diffusers_hook.get_hook(HOOK)]
        self.reset()

    def reset(self) -> None:
        # One state per hooked module; a context names it (diffusers keys the state by the context's name, which a
        # pipeline sets per cond/uncond call: here both halves of guidance are one call, so one name).
        for manager in self.managers:
            manager.reset()
            manager.set_context(CacheContext("latentpatch"))

    def remove(self) -> None:
        remove(self.root, HOOK)
